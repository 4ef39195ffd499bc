// Option haggling on one connection (nbd-proto.md "Fixed newstyle negotiation", "Option
// types", "TLS support"): the server's side of every option, as a state machine that writes
// replies through a sink and tells the connection what to do next. No sockets here.

import { NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO, NBD_MAX_STRING, NBD_OPT, NBD_REP } from '../protocol/constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerEntry,
  OptionDataError,
} from '../protocol/handshake.js';
import { connectionFlags, type ExportTable, type ServedExport } from './exports.js';
import { matchContexts, type MetaContext } from './meta-context.js';

/** off: NOTLS; on: SELECTIVETLS with no TLS-only export; require: FORCEDTLS. */
export type TlsMode = 'off' | 'on' | 'require';

export type NegotiationAction =
  | { readonly kind: 'continue' }
  /** NBD_OPT_ABORT was acknowledged: close once the reply is out. */
  | { readonly kind: 'abort' }
  /** NBD_OPT_STARTTLS was acknowledged: upgrade the stream now. */
  | { readonly kind: 'starttls' }
  /** Hard disconnect (a broken MUST, or an NBD_OPT_EXPORT_NAME that cannot be satisfied). */
  | { readonly kind: 'disconnect'; readonly reason: string }
  | { readonly kind: 'transmission'; readonly exp: ServedExport; readonly structured: boolean; readonly contexts: readonly MetaContext[]; readonly flags: number };

export interface NegotiationMessage {
  readonly option: number;
  /** undefined when the data was over the limit and skipped. */
  readonly data: Buffer | undefined;
  readonly length: number;
}

const CONTINUE: NegotiationAction = { kind: 'continue' };
const utf8 = new TextDecoder('utf-8', { fatal: true });

export class Negotiator {
  private readonly exports: ExportTable;
  private readonly send: (buf: Buffer) => void;
  private readonly tlsMode: TlsMode;
  private fixed = false;
  private noZeroes = false;
  private tlsActive = false;
  private structured = false;
  private contexts: readonly MetaContext[] = [];
  private contextExport: ServedExport | null = null;
  /** Set while the server shuts down: options are refused with NBD_REP_ERR_SHUTDOWN. */
  shuttingDown = false;

  constructor(exports: ExportTable, tlsMode: TlsMode, send: (buf: Buffer) => void) {
    this.exports = exports;
    this.tlsMode = tlsMode;
    this.send = send;
  }

  /** The client flags: returns a reason to disconnect, or null. */
  clientFlags(flags: number): string | null {
    // "the server MUST drop the TCP connection if the client sets an unknown flag"
    if ((flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) return `unknown client flags 0x${flags.toString(16)}`;
    this.fixed = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
    return null;
  }

  /** TLS is up: "the server MUST NOT preserve any negotiation state ... issued before". */
  tlsStarted(): void {
    this.tlsActive = true;
    this.structured = false;
    this.contexts = [];
    this.contextExport = null;
  }

  handle(msg: NegotiationMessage): NegotiationAction {
    const { option } = msg;
    if (option === NBD_OPT.EXPORT_NAME) return this.exportName(msg.data);
    if (!this.fixed) return { kind: 'disconnect', reason: `option ${option} from a client without fixed newstyle` };
    if (option === NBD_OPT.ABORT) {
      // "The server MUST reply with NBD_REP_ACK"; any data "SHOULD" be ignored.
      this.reply(option, NBD_REP.ACK);
      return { kind: 'abort' };
    }
    if (this.tlsMode === 'require' && !this.tlsActive && option !== NBD_OPT.STARTTLS) {
      // FORCEDTLS: "If the server receives any other option, including NBD_OPT_INFO and
      // unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD"
      return this.error(option, NBD_REP.ERR_TLS_REQD, 'TLS is required before any other option');
    }
    if (this.shuttingDown) return this.error(option, NBD_REP.ERR_SHUTDOWN, 'the server is shutting down');
    const data = msg.data;
    if (data === undefined) return this.error(option, NBD_REP.ERR_TOO_BIG, `option data of ${msg.length} bytes is too large`);
    try {
      switch (option) {
        case NBD_OPT.LIST:
          return this.list(data);
        case NBD_OPT.STARTTLS:
          return this.startTls(data);
        case NBD_OPT.INFO:
        case NBD_OPT.GO:
          return this.infoOrGo(option, data);
        case NBD_OPT.STRUCTURED_REPLY:
          return this.structuredReply(data);
        case NBD_OPT.LIST_META_CONTEXT:
        case NBD_OPT.SET_META_CONTEXT:
          return this.metaContext(option, data);
        default:
          // "Servers that receive messages which they do not implement MUST reply to them with
          // NBD_REP_ERR_UNSUP" (NBD_OPT_EXTENDED_HEADERS included: not implemented here).
          return this.error(option, NBD_REP.ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (e) {
      if (e instanceof OptionDataError) return this.error(option, NBD_REP.ERR_INVALID, e.message);
      throw e;
    }
  }

  private reply(option: number, type: number, data?: Buffer | string): void {
    this.send(encodeOptionReply(option, type, data));
  }

  private error(option: number, type: number, message: string): NegotiationAction {
    this.reply(option, type, message);
    return CONTINUE;
  }

  private exportName(data: Buffer | undefined): NegotiationAction {
    if (this.tlsMode === 'require' && !this.tlsActive) {
      // "it MUST terminate the session": the option cannot carry an error.
      return { kind: 'disconnect', reason: 'NBD_OPT_EXPORT_NAME before TLS in require mode' };
    }
    if (data === undefined || data.length > NBD_MAX_STRING) return { kind: 'disconnect', reason: 'NBD_OPT_EXPORT_NAME with an over-long name' };
    let name: string;
    try {
      name = utf8.decode(data);
    } catch {
      return { kind: 'disconnect', reason: 'NBD_OPT_EXPORT_NAME with a name that is not UTF-8' };
    }
    const exp = this.exports.lookup(name);
    if (exp === undefined) return { kind: 'disconnect', reason: `NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name)}` };
    const flags = connectionFlags(exp, this.structured);
    this.send(encodeExportNameReply(exp.backend.sizeBytes, flags, this.noZeroes));
    return this.transmission(exp, flags);
  }

  private transmission(exp: ServedExport, flags: number): NegotiationAction {
    // Contexts count only if set for the export finally chosen.
    const contexts = this.contextExport === exp ? this.contexts : [];
    return { kind: 'transmission', exp, structured: this.structured, contexts, flags };
  }

  private list(data: Buffer): NegotiationAction {
    // "The client MUST NOT send any additional data with the option, and the server SHOULD
    // reject a request that includes data with NBD_REP_ERR_INVALID."
    if (data.length !== 0) return this.error(NBD_OPT.LIST, NBD_REP.ERR_INVALID, 'NBD_OPT_LIST carries no data');
    for (const exp of this.exports.all()) this.reply(NBD_OPT.LIST, NBD_REP.SERVER, encodeServerEntry(exp.name, exp.description));
    this.reply(NBD_OPT.LIST, NBD_REP.ACK);
    return CONTINUE;
  }

  private startTls(data: Buffer): NegotiationAction {
    if (this.tlsMode === 'off') return this.error(NBD_OPT.STARTTLS, NBD_REP.ERR_POLICY, 'TLS is not configured on this server');
    if (data.length !== 0) return this.error(NBD_OPT.STARTTLS, NBD_REP.ERR_INVALID, 'NBD_OPT_STARTTLS carries no data');
    // "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated, it MUST
    // reply with NBD_REP_ERR_INVALID."
    if (this.tlsActive) return this.error(NBD_OPT.STARTTLS, NBD_REP.ERR_INVALID, 'TLS is already active');
    this.reply(NBD_OPT.STARTTLS, NBD_REP.ACK);
    return { kind: 'starttls' };
  }

  private infoOrGo(option: number, data: Buffer): NegotiationAction {
    const { name, infos } = decodeInfoRequest(data);
    const exp = this.exports.lookup(name);
    if (exp === undefined) return this.error(option, NBD_REP.ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`);
    const flags = connectionFlags(exp, this.structured);
    this.reply(option, NBD_REP.INFO, encodeInfoExport(exp.backend.sizeBytes, flags));
    if (infos.includes(NBD_INFO.NAME)) this.reply(option, NBD_REP.INFO, encodeInfoString(NBD_INFO.NAME, exp.name));
    if (infos.includes(NBD_INFO.DESCRIPTION) && exp.description !== '') {
      this.reply(option, NBD_REP.INFO, encodeInfoString(NBD_INFO.DESCRIPTION, exp.description));
    }
    // Sent whether asked or not (as qemu does): a client that did not ask may ignore it, and
    // requests that break the constraints are refused cleanly with EINVAL.
    this.reply(option, NBD_REP.INFO, encodeInfoBlockSize(exp.sizes.minimum, exp.sizes.preferred, exp.sizes.maximum));
    this.reply(option, NBD_REP.ACK);
    return option === NBD_OPT.GO ? this.transmission(exp, flags) : CONTINUE;
  }

  private structuredReply(data: Buffer): NegotiationAction {
    if (data.length !== 0) return this.error(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY carries no data');
    if (this.structured) return this.error(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_INVALID, 'structured replies are already negotiated');
    this.structured = true;
    this.reply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK);
    return CONTINUE;
  }

  private metaContext(option: number, data: Buffer): NegotiationAction {
    const setting = option === NBD_OPT.SET_META_CONTEXT;
    // "Issuing this command replaces all previously-set metadata contexts (including when this
    // command fails)"
    if (setting) {
      this.contexts = [];
      this.contextExport = null;
    }
    // "This option MUST NOT be requested unless structured replies have been negotiated first.
    // If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID."
    if (!this.structured) return this.error(option, NBD_REP.ERR_INVALID, 'metadata contexts need structured replies first');
    const { name, queries } = decodeMetaContextRequest(data);
    const exp = this.exports.lookup(name);
    if (exp === undefined) return this.error(option, NBD_REP.ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`);
    const found = matchContexts(exp, queries, !setting);
    // "The metadata context ID in these replies is reserved and SHOULD be set to zero" (LIST).
    for (const ctx of found) this.reply(option, NBD_REP.META_CONTEXT, encodeMetaContextReply(setting ? ctx.id : 0, ctx.name));
    this.reply(option, NBD_REP.ACK);
    if (setting) {
      this.contexts = found;
      this.contextExport = exp;
    }
    return CONTINUE;
  }
}
