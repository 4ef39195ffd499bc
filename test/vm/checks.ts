// The result protocol between guest scripts and host tests: each check is one JSON line
// {suite, check, ok, detail?} and each timing {timing, ms} in $IMGBD_VM_RESULTS. Guest shell
// scripts source SH_CHECK_PRELUDE; guest node scripts use guest/report.ts.

import assert from 'node:assert/strict';
import type { VmResult } from './harness.js';

export interface VmCheck {
  readonly suite: string;
  readonly check: string;
  readonly ok: boolean;
  readonly detail?: unknown;
}

export interface VmTiming {
  readonly timing: string;
  readonly ms: number;
}

/**
 * sh functions for guest scripts (set SUITE first):
 *   check NAME CMD...      runs CMD, records ok/failed with the tail of its output; returns its status
 *   timing NAME            records the ms since the previous timing (or the script start)
 *   wait_for SECS CMD...   retries CMD every 0.1 s (partition nodes, sysfs values appear late)
 */
export const SH_CHECK_PRELUDE = `
R="$IMGBD_VM_RESULTS"
SUITE=\${SUITE:-guest}
now() { date +%s%3N; }
LAST=$(now)
report() {
  d=$(printf '%s' "$3" | tail -c 400 | tr -d '"\\\\' | tr '\\n\\r\\t' '   ')
  printf '{"suite":"%s","check":"%s","ok":%s,"detail":"%s"}\\n' "$SUITE" "$1" "$2" "$d" >> "$R"
}
check() {
  name=$1; shift
  if out=$("$@" 2>&1); then report "$name" true "$out"; else report "$name" false "$out"; return 1; fi
}
timing() {
  t=$(now)
  printf '{"timing":"%s","ms":%s}\\n' "$1" "$((t - LAST))" >> "$R"
  LAST=$t
}
wait_for() {
  n=$(($1 * 10)); shift
  while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.1; n=$((n - 1)); done
  "$@"
}
`;

export function vmChecks(r: VmResult, suite?: string): VmCheck[] {
  return r.results.filter((x): x is VmCheck => typeof (x as VmCheck).check === 'string' && (suite === undefined || (x as VmCheck).suite === suite));
}

export function vmTimings(r: VmResult): VmTiming[] {
  return r.results.filter((x): x is VmTiming => typeof (x as VmTiming).timing === 'string');
}

/** Every check of `suite` passed, and each of `names` ran (a check that never ran is a failure). */
export function assertVmChecks(r: VmResult, suite: string, names: readonly string[]): void {
  const got = vmChecks(r, suite);
  const failed = got.filter((c) => !c.ok);
  assert.deepEqual(failed, [], `failed ${suite} checks; guest output:\n${r.output.slice(-3000)}`);
  for (const name of names) {
    assert.ok(
      got.some((c) => c.check === name),
      `${suite} check ${name} did not run; guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-2000)}`,
    );
  }
}
