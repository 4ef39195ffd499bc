// The client side of fixed-newstyle negotiation (nbd-proto.md "Fixed newstyle negotiation",
// "Option types", "TLS support", "Size constraints"): greeting, client flags, STARTTLS,
// STRUCTURED_REPLY, SET_META_CONTEXT, then GO (or EXPORT_NAME on servers without GO), plus
// the one-shot queries LIST, INFO and LIST_META_CONTEXT that end with NBD_OPT_ABORT.

import net from 'node:net';
import tls from 'node:tls';
import type { BlockSizes } from '../block/device.js';
import { ProtocolError } from '../errors.js';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  isOptionReplyError,
} from '../protocol/constants.js';
import {
  decodeInfoReply,
  decodeMetaContextReply,
  decodeServerEntry,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from '../protocol/handshake.js';
import { ReplyParser, type ReplyEvent } from '../protocol/reply-parser.js';
import { NbdConnectError, NbdOptionError, NbdTlsError, optionName, replyTypeName } from './errors.js';
import { describeTarget, type ResolvedTarget } from './target.js';
import { buildTlsOptions } from './tls.js';
import { Wire } from './wire.js';

export interface ExportInfo {
  /** The name that was asked for. */
  readonly name: string;
  /** NBD_INFO_NAME: the server's canonical name, when it sent one. */
  readonly canonicalName?: string;
  readonly description?: string;
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  readonly blockSizes?: BlockSizes;
}

export interface ExportListEntry {
  readonly name: string;
  readonly description: string;
}

export interface Session {
  readonly wire: Wire;
  readonly handshakeFlags: number;
  readonly fixedNewstyle: boolean;
  readonly noZeroes: boolean;
  readonly tls: boolean;
  /** The TCP or unix socket under any TLS layer (it carries the handshake timeout). */
  readonly rawSocket: net.Socket;
}

export interface NegotiateOptions {
  readonly structuredReplies: boolean;
  readonly metaContexts: readonly string[];
  readonly requestInfo: boolean;
  /** Largest structured chunk the parser accepts for anything but an announced read. */
  readonly maxChunkPayloadBytes?: number;
}

export interface Negotiated {
  readonly session: Session;
  readonly info: ExportInfo;
  readonly structuredReplies: boolean;
  /** Negotiated metadata contexts: id -> name. */
  readonly metaContexts: ReadonlyMap<number, string>;
}

type OptionReply = Extract<ReplyEvent, { kind: 'option-reply' }>;

const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;

function openSocket(target: ResolvedTarget): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = target.socket !== undefined ? net.connect({ path: target.socket }) : net.connect({ host: target.host!, port: target.port, noDelay: true });
    const onError = (err: Error): void => {
      socket.destroy();
      reject(new NbdConnectError(`cannot connect to ${describeTarget(target)}: ${err.message}`, { cause: err }));
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      // A peer that never completes the handshake (not an NBD server, or a stuck one) must
      // not hang the caller; transmission clears this, requests may legitimately be slow.
      socket.setTimeout(target.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS, () =>
        socket.destroy(new NbdConnectError(`the NBD handshake with ${describeTarget(target)} timed out`)),
      );
      // "both the client and server SHOULD disable Nagle's algorithm"
      if (target.socket === undefined) socket.setNoDelay(true);
      resolve(socket);
    });
  });
}

async function nextOptionReply(wire: Wire, option: number): Promise<OptionReply> {
  const ev = await wire.next();
  if (ev.kind !== 'option-reply') throw new ProtocolError('ERR_NBD_PROTOCOL', `expected an option reply, got ${ev.kind}`);
  if (ev.option !== option) {
    throw new ProtocolError('ERR_NBD_PROTOCOL', `reply for ${optionName(ev.option)} while waiting for ${optionName(option)}`);
  }
  return ev;
}

/**
 * Send one option and collect its replies up to the final one (ACK or an error): "The
 * client MUST NOT send any option until it has received a final reply to any option it
 * has sent".
 */
async function sendOption(wire: Wire, option: number, data?: Buffer, intermediate: readonly number[] = []): Promise<{ replies: OptionReply[]; final: OptionReply }> {
  wire.write(encodeOption(option, data));
  const replies: OptionReply[] = [];
  for (;;) {
    const r = await nextOptionReply(wire, option);
    if (r.type === NBD_REP.ACK || isOptionReplyError(r.type)) return { replies, final: r };
    if (!intermediate.includes(r.type)) {
      throw new ProtocolError('ERR_NBD_PROTOCOL', `unexpected ${replyTypeName(r.type)} in reply to ${optionName(option)}`);
    }
    replies.push(r);
  }
}

function refuse(reply: OptionReply): NbdOptionError {
  return new NbdOptionError(reply.option, reply.type, reply.data.toString('utf8'));
}

/** Greeting, client flags and (when asked for) STARTTLS: everything before the first stateful option. */
export async function startSession(target: ResolvedTarget, opts: { maxChunkPayloadBytes?: number } = {}): Promise<Session> {
  const parserOpts = opts.maxChunkPayloadBytes !== undefined ? { maxChunkPayloadBytes: opts.maxChunkPayloadBytes } : {};
  // Unusable credentials are found before any connection is made.
  const tlsOptions = target.tls !== undefined ? await buildTlsOptions(target.tls, target.host) : undefined;
  const socket = await openSocket(target);
  let wire = new Wire(socket, new ReplyParser(parserOpts));
  try {
    const greeting = await wire.next();
    if (greeting.kind !== 'greeting') throw new ProtocolError('ERR_NBD_PROTOCOL', 'expected the server greeting');
    const fixedNewstyle = (greeting.handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (greeting.handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    // Only flags the server offered: "the server MUST close the TCP connection if it does
    // not recognize the client's flags".
    wire.write(encodeClientFlags((fixedNewstyle ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
    let tlsUp = false;
    if (tlsOptions !== undefined) {
      // "The client MUST NOT issue NBD_OPT_STARTTLS unless the server set flag NBD_FLAG_FIXED_NEWSTYLE"
      if (!fixedNewstyle) throw new NbdTlsError('TLS was requested but the server does not speak fixed newstyle, so it cannot do STARTTLS');
      const { final } = await sendOption(wire, NBD_OPT.STARTTLS);
      // "a client which only wishes to use TLS SHOULD terminate the session if the
      // NBD_OPT_STARTTLS replies with an error"
      if (final.type !== NBD_REP.ACK) throw new NbdTlsError(`TLS was requested but the server refused STARTTLS`, { cause: refuse(final) });
      wire = await upgradeToTls(wire, tlsOptions, parserOpts);
      tlsUp = true;
    }
    return { wire, handshakeFlags: greeting.handshakeFlags, fixedNewstyle, noZeroes, tls: tlsUp, rawSocket: socket };
  } catch (err) {
    wire.socket.destroy();
    throw err;
  }
}

async function upgradeToTls(plain: Wire, options: tls.ConnectionOptions, parserOpts: { maxChunkPayloadBytes?: number }): Promise<Wire> {
  const raw = plain.detach();
  const secure = tls.connect({ ...options, socket: raw });
  // Listen before the handshake so a server that closes early is still seen by the Wire.
  const wire = new Wire(secure, new ReplyParser({ ...parserOpts, phase: 'options' }));
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => {
      secure.destroy();
      reject(new NbdTlsError(`TLS handshake failed: ${err.message}`, { cause: err }));
    };
    secure.once('error', onError);
    secure.once('close', () => reject(new NbdTlsError('the server closed the connection during the TLS handshake')));
    secure.once('secureConnect', () => {
      secure.off('error', onError);
      resolve();
    });
  });
  return wire;
}

/** Soft disconnect during the handshake: NBD_OPT_ABORT, then close whatever the server does. */
export async function abortSession(session: Session): Promise<void> {
  const { wire } = session;
  if (wire.failed === null && session.fixedNewstyle) {
    try {
      wire.write(encodeOption(NBD_OPT.ABORT));
      // "the client SHOULD gracefully handle the server closing the connection after
      // receiving an NBD_OPT_ABORT without it sending a reply"
      await Promise.race([wire.next().catch(() => undefined), new Promise((r) => setTimeout(r, 1000).unref())]);
    } catch {
      // the connection is going away regardless
    }
  }
  await closeSocket(wire.socket);
}

export function closeSocket(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve();
    const timer = setTimeout(() => socket.destroy(), 2000).unref();
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    // end() sends the TLS close_notify before the FIN on a TLS socket.
    socket.end();
  });
}

const BLOCK_INFO_REQUESTS = [NBD_INFO.BLOCK_SIZE, NBD_INFO.NAME, NBD_INFO.DESCRIPTION];

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Collect NBD_REP_INFO replies of an INFO or GO that ended in ACK. */
function collectInfo(name: string, replies: readonly OptionReply[]): ExportInfo {
  let exportPart: { sizeBytes: number; transmissionFlags: number } | undefined;
  let canonicalName: string | undefined;
  let description: string | undefined;
  let blockSizes: BlockSizes | undefined;
  for (const r of replies) {
    const info = decodeInfoReply(r.data);
    switch (info.type) {
      case 'export':
        exportPart = { sizeBytes: info.sizeBytes, transmissionFlags: info.transmissionFlags };
        break;
      case 'name':
        canonicalName = info.name;
        break;
      case 'description':
        description = info.description;
        break;
      case 'block-size':
        // The client will align requests to `minimum`: a value that is not a power of two
        // up to 64 KiB, or a maximum below it, would make that impossible.
        if (!isPowerOfTwo(info.minimum) || info.minimum > 65536 || info.maximum < info.minimum || info.preferred < info.minimum) {
          throw new ProtocolError('ERR_NBD_PROTOCOL', `invalid block sizes ${info.minimum}/${info.preferred}/${info.maximum}`);
        }
        blockSizes = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
        break;
      case 'unknown':
        break; // "The client MUST ignore information replies it does not understand."
    }
  }
  // "In this case, the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type."
  if (!exportPart) throw new ProtocolError('ERR_NBD_PROTOCOL', 'NBD_REP_ACK without NBD_INFO_EXPORT');
  return {
    name,
    ...exportPart,
    ...(canonicalName !== undefined ? { canonicalName } : {}),
    ...(description !== undefined ? { description } : {}),
    ...(blockSizes !== undefined ? { blockSizes } : {}),
  };
}

async function infoOrGo(wire: Wire, option: typeof NBD_OPT.INFO | typeof NBD_OPT.GO, name: string, requestInfo: boolean): Promise<ExportInfo | OptionReply> {
  let infos = requestInfo ? BLOCK_INFO_REQUESTS : [];
  for (let attempt = 0; ; attempt++) {
    const { replies, final } = await sendOption(wire, option, encodeInfoRequest(name, infos), [NBD_REP.INFO]);
    if (final.type === NBD_REP.ACK) return collectInfo(name, replies);
    // The server insists on block sizes: ask for them once (and then obey them).
    if (final.type === NBD_REP.ERR_BLOCK_SIZE_REQD && attempt === 0 && !infos.includes(NBD_INFO.BLOCK_SIZE)) {
      infos = [NBD_INFO.BLOCK_SIZE];
      continue;
    }
    return final;
  }
}

/** Full negotiation up to the transmission phase. */
export async function negotiate(target: ResolvedTarget, opts: NegotiateOptions): Promise<Negotiated> {
  const session = await startSession(target, opts.maxChunkPayloadBytes !== undefined ? { maxChunkPayloadBytes: opts.maxChunkPayloadBytes } : {});
  const { wire } = session;
  try {
    let structuredReplies = false;
    const metaContexts = new Map<number, string>();
    if (session.fixedNewstyle) {
      if (opts.structuredReplies) {
        const { final } = await sendOption(wire, NBD_OPT.STRUCTURED_REPLY);
        if (final.type === NBD_REP.ACK) structuredReplies = true;
        else if (final.type === NBD_REP.ERR_TLS_REQD) throw refuse(final);
      }
      if (structuredReplies && opts.metaContexts.length > 0) {
        const { replies, final } = await sendOption(wire, NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequest(target.exportName, opts.metaContexts), [NBD_REP.META_CONTEXT]);
        if (final.type === NBD_REP.ACK) {
          for (const r of replies) {
            const mc = decodeMetaContextReply(r.data);
            if (metaContexts.has(mc.id)) throw new ProtocolError('ERR_NBD_PROTOCOL', `metadata context id ${mc.id} returned twice`);
            metaContexts.set(mc.id, mc.name);
          }
        } else if (final.type === NBD_REP.ERR_TLS_REQD || final.type === NBD_REP.ERR_UNKNOWN) {
          throw refuse(final);
        }
        // Other errors (UNSUP, ...) just mean no block status.
      }
      const go = await infoOrGo(wire, NBD_OPT.GO, target.exportName, opts.requestInfo);
      if ('sizeBytes' in go) return { session, info: go, structuredReplies, metaContexts };
      // "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by falling back to using NBD_OPT_EXPORT_NAME"
      if (go.type !== NBD_REP.ERR_UNSUP) throw refuse(go);
    }
    wire.parser.expectExportNameReply(session.noZeroes);
    wire.write(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from(target.exportName, 'utf8')));
    const ev = await wire.next().catch((err: unknown) => {
      // "If the chosen export does not exist ... the server MUST terminate the session."
      throw new ProtocolError('ERR_NBD_CLOSED', `the server closed the connection after NBD_OPT_EXPORT_NAME ${JSON.stringify(target.exportName)} (no such export?)`, { cause: err });
    });
    if (ev.kind !== 'export-name-reply') throw new ProtocolError('ERR_NBD_PROTOCOL', `expected the NBD_OPT_EXPORT_NAME reply, got ${ev.kind}`);
    return { session, info: { name: target.exportName, sizeBytes: ev.sizeBytes, transmissionFlags: ev.transmissionFlags }, structuredReplies, metaContexts };
  } catch (err) {
    if (err instanceof NbdOptionError) await abortSession(session);
    else wire.socket.destroy();
    throw err;
  }
}

async function withSession<T>(target: ResolvedTarget, fn: (s: Session) => Promise<T>): Promise<T> {
  const session = await startSession(target);
  try {
    if (!session.fixedNewstyle) throw new ProtocolError('ERR_NBD_PROTOCOL', 'the server does not speak fixed newstyle, so it cannot answer queries');
    const result = await fn(session);
    await abortSession(session);
    return result;
  } catch (err) {
    session.wire.socket.destroy();
    throw err;
  }
}

/** NBD_OPT_LIST: every export the server is willing to list. */
export function listExports(target: ResolvedTarget): Promise<ExportListEntry[]> {
  return withSession(target, async ({ wire }) => {
    const { replies, final } = await sendOption(wire, NBD_OPT.LIST, undefined, [NBD_REP.SERVER]);
    if (final.type !== NBD_REP.ACK) throw refuse(final);
    return replies.map((r) => decodeServerEntry(r.data));
  });
}

/** NBD_OPT_INFO: details of one export without entering transmission. */
export function queryExport(target: ResolvedTarget, name: string): Promise<ExportInfo> {
  return withSession(target, async ({ wire }) => {
    const r = await infoOrGo(wire, NBD_OPT.INFO, name, true);
    if (!('sizeBytes' in r)) throw refuse(r);
    return r;
  });
}

/** NBD_OPT_LIST_META_CONTEXT (after STRUCTURED_REPLY, which servers may require). */
export function listMetaContexts(target: ResolvedTarget, name: string, queries: readonly string[] = []): Promise<string[]> {
  return withSession(target, async ({ wire }) => {
    const sr = await sendOption(wire, NBD_OPT.STRUCTURED_REPLY);
    if (sr.final.type !== NBD_REP.ACK) throw refuse(sr.final);
    const { replies, final } = await sendOption(wire, NBD_OPT.LIST_META_CONTEXT, encodeMetaContextRequest(name, queries), [NBD_REP.META_CONTEXT]);
    // "If an error is returned, the client MUST disregard any context replies that may have been sent."
    if (final.type !== NBD_REP.ACK) throw refuse(final);
    return replies.map((r) => decodeMetaContextReply(r.data).name);
  });
}
