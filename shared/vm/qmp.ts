/**
 * A small typed QMP client (QEMU Machine Protocol over a Unix socket): the greeting and capability
 * negotiation, commands with their replies in order, and events. Only what the handoff uses is typed.
 */
import { connect, type Socket } from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** The commands the handoff sends, with their arguments and results. */
export interface QmpCommands {
  qmp_capabilities: { args: undefined; result: Record<string, never> };
  stop: { args: undefined; result: Record<string, never> };
  cont: { args: undefined; result: Record<string, never> };
  'query-status': { args: undefined; result: { running: boolean; status: string } };
  'migrate-set-capabilities': { args: { capabilities: { capability: string; state: boolean }[] }; result: Record<string, never> };
  migrate: { args: { uri: string }; result: Record<string, never> };
  'migrate-incoming': { args: { uri: string }; result: Record<string, never> };
  'query-migrate': { args: undefined; result: MigrationStatus };
  'migrate-set-parameters': { args: Record<string, unknown>; result: Record<string, never> };
  quit: { args: undefined; result: Record<string, never> };
  migrate_cancel: { args: undefined; result: Record<string, never> };
  'query-version': { args: undefined; result: { qemu: { major: number; minor: number; micro: number }; package: string } };
  /** whether the VM runs under KVM (else TCG, for the handoff's purposes) */
  /** an HMP command line, for what QMP does not tell (`info mtree -f`, `gpa2hva`): its output as text */
  'human-monitor-command': { args: { 'command-line': string }; result: string };
  'query-kvm': { args: undefined; result: { enabled: boolean; present: boolean } };
}

/** query-migrate's answer, as far as the handoff reads it. */
export interface MigrationStatus {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  /** ms the VM was stopped, once completed */
  downtime?: number;
  'expected-downtime'?: number;
  /** how far auto-converge throttles the vCPUs (present while it does) */
  'cpu-throttle-percentage'?: number;
  ram?: { transferred: number; remaining?: number; 'dirty-sync-count'?: number; 'dirty-pages-rate'?: number; mbps?: number };
}

export class QmpError extends Error {
  override name = 'QmpError';
}

export class QmpClient {
  private buffer = '';
  private readonly pending: { resolve: (v: unknown) => void; reject: (e: Error) => void; command: string }[] = [];
  private readonly listeners = new Set<(e: QmpEvent) => void>();
  private closedError: Error | undefined;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.onData(text));
    const closed = (err?: Error): void => {
      this.closedError ??= new QmpError(`QMP connection closed${err ? `: ${err.message}` : ''}`);
      for (const p of this.pending.splice(0)) p.reject(this.closedError);
    };
    socket.on('error', closed);
    socket.on('close', () => closed());
  }

  /** Connects (retrying while QEMU creates the socket) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        await client.greeting();
        await client.execute('qmp_capabilities');
        return client;
      } catch (err) {
        if (Date.now() > deadline) throw new QmpError(`cannot open QMP at ${path}: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  private greeted: (() => void) | undefined;
  private greeting(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.greeted = resolve;
      setTimeout(() => reject(new QmpError('no QMP greeting within 10 s')), 10_000).unref();
    });
  }

  private onData(text: string): void {
    this.buffer += text;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if ('QMP' in msg) {
        this.greeted?.();
        continue;
      }
      if ('event' in msg) {
        for (const l of this.listeners) l(msg as unknown as QmpEvent);
        continue;
      }
      const p = this.pending.shift();
      if (!p) continue;
      if ('error' in msg) {
        const e = msg.error as { class?: string; desc?: string };
        p.reject(new QmpError(`${p.command}: ${e.desc ?? 'error'} (${e.class ?? '?'})`));
      } else p.resolve(msg.return);
    }
  }

  /** Runs a command; resolves with its result, rejects with QEMU's error. Replies come in order. */
  execute<C extends keyof QmpCommands>(command: C, ...args: QmpCommands[C]['args'] extends undefined ? [] : [QmpCommands[C]['args']]): Promise<QmpCommands[C]['result']> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve: resolve as (v: unknown) => void, reject, command });
      this.socket.write(`${JSON.stringify(args.length ? { execute: command, arguments: args[0] } : { execute: command })}\n`);
    });
  }

  /** Calls `listener` for every event until the returned function is called. */
  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Polls query-migrate until it completes (or fails, naming QEMU's reason). */
  async waitMigration(timeoutMs = 60_000): Promise<void> {
    const started = Date.now();
    const deadline = started + timeoutMs;
    for (;;) {
      const s = await this.execute('query-migrate');
      if (s.status === 'completed') return;
      if (s.status === 'failed' || s.status === 'cancelled') throw new QmpError(`migration ${s.status}: ${s['error-desc'] ?? 'no reason given'}`);
      if (Date.now() > deadline) throw new QmpError(`migration still ${s.status ?? 'not started'} after ${timeoutMs / 1000} s`);
      // a device state takes tens of milliseconds and is downtime: poll finely at first
      await new Promise((r) => setTimeout(r, Date.now() - started < 2000 ? 5 : 100));
    }
  }

  close(): void {
    this.socket.destroy();
  }
}
