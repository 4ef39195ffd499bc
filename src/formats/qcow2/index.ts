// Public surface of the qcow2 driver: open (on a HostFile or by path), create, the format
// registry entry, and the types callers see.

export { Qcow2Device, openQcow2, type BackingRef, type Qcow2OpenOptions } from './driver.js';
export { createQcow2, type Qcow2CreateOptions } from './create.js';
export { qcow2Format, openQcow2Path, QCOW2_MAX_BACKING_DEPTH, type Qcow2PathOptions } from './format.js';
export type { CheckMode, CheckResult } from './check.js';
export type { Qcow2Header, Qcow2FeatureName, Qcow2Extension } from './header.js';
export type { Qcow2Snapshot } from './snapshot.js';
export { describeQcow2, type Qcow2Info } from './info.js';
