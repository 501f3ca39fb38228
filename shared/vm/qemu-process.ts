/**
 * The QEMU behind a QMP socket, and what of its command line a destination must match. QEMU loads a
 * migration only into the same machine: the same machine type, RAM size, devices (in the same order,
 * since automatic PCI slots follow it and device state is keyed by slot), network backends and
 * drive interfaces. Local paths are not part of it: each cloudlet has its own.
 */
import { readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';

export interface QemuProcess {
  pid: number;
  argv: string[];
}

/** Unix socket inodes listening on `socketPath`, from one /proc/.../net/unix table. */
function listeningInodes(table: string, socketPath: string): number[] {
  const inodes: number[] = [];
  for (const line of table.split('\n').slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path
    const fields = line.trim().split(/\s+/);
    if (fields.length < 8 || fields.slice(7).join(' ') !== socketPath) continue;
    const acceptsConnections = (parseInt(fields[3]!, 16) & 0x10000) !== 0;
    if (acceptsConnections) inodes.push(Number(fields[6]));
  }
  return inodes;
}

function pids(): number[] {
  return readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map(Number);
}

function holder(inodes: number[]): number | undefined {
  const wanted = new Set(inodes.map((i) => `socket:[${i}]`));
  for (const pid of pids()) {
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (wanted.has(readlinkSync(`/proc/${pid}/fd/${fd}`))) return pid;
      } catch {
        // closed meanwhile
      }
    }
  }
  return undefined;
}

/** argv of a process, from /proc/PID/cmdline (NUL-separated). */
export function processArgv(pid: number): string[] {
  const raw = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  return raw.split('\0').slice(0, raw.endsWith('\0') ? -1 : undefined);
}

/**
 * The process serving the QMP socket at `qmpSocket`: the socket's inode in /proc/net/unix, then the
 * process holding an fd `socket:[inode]`. A QEMU in another network namespace lists its sockets in
 * that namespace's table only, so those are looked at too. Needs to see other users' fds (root).
 */
export function findQemuByQmpSocket(qmpSocket: string): QemuProcess {
  let inodes = listeningInodes(readFileSync('/proc/net/unix', 'utf8'), qmpSocket);
  if (inodes.length === 0) {
    const seen = new Set<number>();
    for (const pid of pids()) {
      try {
        const ns = statSync(`/proc/${pid}/ns/net`).ino;
        if (seen.has(ns)) continue;
        seen.add(ns);
        inodes = listeningInodes(readFileSync(`/proc/${pid}/net/unix`, 'utf8'), qmpSocket);
      } catch {
        continue;
      }
      if (inodes.length) break;
    }
  }
  if (inodes.length === 0) throw new Error(`no process listens on the QMP socket ${qmpSocket}`);
  const pid = holder(inodes) ?? fail(`the QMP socket ${qmpSocket} is open but no process it is visible to holds it (run as root)`);
  return { pid, argv: processArgv(pid) };
}

function fail(message: string): never {
  throw new Error(message);
}

export interface DeviceDescription {
  driver: string;
  /** what decides where the device sits: explicit bus and PCI address, when given */
  bus?: string;
  addr?: string;
  /** from -nic or -net nic rather than -device */
  fromNic?: boolean;
}

export interface DriveDescription {
  interface: string;
  media: string;
  format?: string;
  index?: number;
  /** local path: reported, never compared */
  file?: string;
}

export interface MachineDescription {
  /** as given (an alias such as `pc` or `q35`), QEMU's default when absent */
  machineType: string;
  accel?: string;
  memoryBytes: number;
  cpus: number;
  /** QEMU's default devices (no -nodefaults) */
  defaults: boolean;
  vga: string;
  /** NICs from -nic/-net first (QEMU creates them with the machine), then -device in order */
  devices: DeviceDescription[];
  /** network backend types (user, tap, ...), each keeps state or a host resource */
  netBackends: string[];
  drives: DriveDescription[];
}

/** Options that take no argument (all others take one). */
const FLAGS = new Set([
  'nodefaults', 'no-reboot', 'no-shutdown', 'S', 'enable-kvm', 'daemonize', 'snapshot', 'nographic', 'no-hpet', 'no-acpi', 'no-user-config',
  'full-screen', 's', 'usb', 'win2k-hack', 'no-fd-bootchk', 'only-migratable', 'preconfig', 'enable-sync-profile', 'semihosting', 'no-quit',
  'alt-grab', 'ctrl-grab', 'rtc-td-hack', 'singlestep', 'xen-attach', 'nodefconfig', 'version', 'help', 'curses', 'old-param',
]);

/** Whether QEMU option `name` (without its dashes) takes no argument. */
export function isQemuFlag(name: string): boolean {
  return FLAGS.has(name);
}

/** QemuOpts syntax: `implied,key=value,...` with `,,` for a comma in a value. */
export function parseQemuOpts(text: string, impliedKey?: string): Map<string, string> {
  const parts: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',') {
      if (text[i + 1] === ',') {
        current += ',';
        i++;
      } else {
        parts.push(current);
        current = '';
      }
    } else current += text[i];
  }
  parts.push(current);
  const opts = new Map<string, string>();
  parts.forEach((part, i) => {
    if (part === '') return;
    const eq = part.indexOf('=');
    if (eq < 0) opts.set(i === 0 && impliedKey ? impliedKey : part, i === 0 && impliedKey ? part : 'on');
    else opts.set(part.slice(0, eq), part.slice(eq + 1));
  });
  return opts;
}

const SIZE_UNITS: Record<string, number> = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** A QEMU size (`1G`, `1024M`, `512`): a bare number is in `defaultUnit` (MiB for -m). */
export function parseQemuSize(text: string, defaultUnit = 2 ** 20): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe])?i?b?\s*$/i.exec(text);
  if (!m) throw new Error(`not a size: "${text}"`);
  const unit = m[2] ? SIZE_UNITS[m[2].toLowerCase()]! : defaultUnit;
  return Math.round(Number(m[1]) * unit);
}

/** The machine types QEMU 7.2's x86 aliases stand for. */
export function resolveMachineType(type: string, qemuVersion = '7.2'): string {
  if (type === 'pc') return `pc-i440fx-${qemuVersion}`;
  if (type === 'q35') return `pc-q35-${qemuVersion}`;
  return type;
}

function deviceFrom(value: string): DeviceDescription {
  let props: Map<string, string>;
  if (value.trimStart().startsWith('{')) {
    const json = JSON.parse(value) as Record<string, unknown>;
    props = new Map(Object.entries(json).map(([k, v]) => [k, String(v)]));
  } else props = parseQemuOpts(value, 'driver');
  const device: DeviceDescription = { driver: props.get('driver') ?? fail(`-device ${value}: no driver`) };
  const bus = props.get('bus');
  const addr = props.get('addr');
  if (bus !== undefined) device.bus = bus;
  if (addr !== undefined) device.addr = addr;
  return device;
}

const DRIVE_OPTIONS: Record<string, { interface: string; index?: number; media?: string }> = {
  hda: { interface: 'ide', index: 0 },
  hdb: { interface: 'ide', index: 1 },
  hdc: { interface: 'ide', index: 2 },
  hdd: { interface: 'ide', index: 3 },
  cdrom: { interface: 'ide', index: 2, media: 'cdrom' },
  fda: { interface: 'floppy', index: 0 },
  fdb: { interface: 'floppy', index: 1 },
  sd: { interface: 'sd' },
  pflash: { interface: 'pflash' },
  mtdblock: { interface: 'mtd' },
};

/** Whether `name` (without its dashes) is a drive option of old (-hda, -cdrom, ...), its value the image. */
export function isLegacyDriveOption(name: string): boolean {
  return Object.hasOwn(DRIVE_OPTIONS, name);
}

/** What of a QEMU command line (argv, with or without the program) the destination must match. */
export function describeMachine(argv: readonly string[]): MachineDescription {
  const machine: MachineDescription = { machineType: 'pc', memoryBytes: 128 * 2 ** 20, cpus: 1, defaults: true, vga: '', devices: [], netBackends: [], drives: [] };
  const nics: DeviceDescription[] = [];
  const devices: DeviceDescription[] = [];
  let vga: string | undefined;
  let noDefaultNic = false;
  const args = argv[0] && !argv[0].startsWith('-') ? argv.slice(1) : argv;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (!arg.startsWith('-')) {
      // a bare image path is -hda
      machine.drives.push({ interface: 'ide', media: 'disk', index: 0, file: arg });
      continue;
    }
    // QEMU takes -opt and --opt alike, the value always as the next argument
    const name = arg.replace(/^--?/, '');
    if (FLAGS.has(name)) {
      if (name === 'nodefaults') machine.defaults = false;
      if (name === 'enable-kvm') machine.accel = 'kvm';
      continue;
    }
    const value = args[++i];
    if (value === undefined) throw new Error(`${arg} needs an argument`);
    switch (name) {
      case 'M':
      case 'machine': {
        const opts = parseQemuOpts(value, 'type');
        const type = opts.get('type');
        if (type) machine.machineType = type;
        const accel = opts.get('accel');
        if (accel) machine.accel = accel;
        break;
      }
      case 'accel':
        machine.accel = parseQemuOpts(value, 'accel').get('accel') ?? machine.accel;
        break;
      case 'm': {
        const size = parseQemuOpts(value, 'size').get('size');
        if (size) machine.memoryBytes = parseQemuSize(size);
        break;
      }
      case 'smp': {
        const opts = parseQemuOpts(value, 'cpus');
        const topology = ['sockets', 'dies', 'clusters', 'cores', 'threads'].map((k) => Number(opts.get(k) ?? 1));
        machine.cpus = opts.has('cpus') ? Number(opts.get('cpus')) : topology.reduce((a, b) => a * b, 1);
        break;
      }
      case 'device':
        devices.push(deviceFrom(value));
        break;
      case 'nic': {
        const opts = parseQemuOpts(value, 'type');
        noDefaultNic = true;
        const type = opts.get('type') ?? 'user';
        if (type === 'none') break;
        machine.netBackends.push(type);
        nics.push({ driver: opts.get('model') ?? 'default-nic', fromNic: true });
        break;
      }
      case 'netdev': {
        noDefaultNic = true;
        const type = parseQemuOpts(value, 'type').get('type');
        if (type) machine.netBackends.push(type);
        break;
      }
      case 'net': {
        noDefaultNic = true;
        const opts = parseQemuOpts(value, 'type');
        const type = opts.get('type');
        if (type === 'nic') nics.push({ driver: opts.get('model') ?? 'default-nic', fromNic: true });
        else if (type && type !== 'none') machine.netBackends.push(type);
        break;
      }
      case 'vga':
        vga = value;
        break;
      case 'drive': {
        const opts = parseQemuOpts(value, 'file');
        const drive: DriveDescription = { interface: opts.get('if') ?? 'ide', media: opts.get('media') ?? 'disk' };
        const format = opts.get('format');
        const index = opts.get('index');
        const file = opts.get('file');
        if (format !== undefined) drive.format = format;
        if (index !== undefined) drive.index = Number(index);
        if (file !== undefined) drive.file = file;
        machine.drives.push(drive);
        break;
      }
      default: {
        const legacy = DRIVE_OPTIONS[name];
        if (legacy) {
          const drive: DriveDescription = { interface: legacy.interface, media: legacy.media ?? 'disk', file: value };
          if (legacy.index !== undefined) drive.index = legacy.index;
          machine.drives.push(drive);
        }
      }
    }
  }
  // QEMU's default NIC (an e1000 on user networking) comes with the defaults unless a network is given
  if (machine.defaults && !noDefaultNic) {
    nics.push({ driver: 'default-nic', fromNic: true });
    machine.netBackends.push('user');
  }
  machine.vga = vga ?? (machine.defaults ? 'std' : 'none');
  // QEMU 7.2's default NIC model: e1000e on q35, e1000 on the i440fx pc
  const defaultNic = /q35/.test(machine.machineType) ? 'e1000e' : 'e1000';
  machine.devices = [...nics.map((n) => (n.driver === 'default-nic' ? { ...n, driver: defaultNic } : n)), ...devices];
  return machine;
}

function mib(bytes: number): string {
  return `${bytes / 2 ** 20} MiB`;
}

function deviceName(d: DeviceDescription): string {
  const where = [d.bus && `bus=${d.bus}`, d.addr && `addr=${d.addr}`].filter(Boolean).join(',');
  return where ? `${d.driver} (${where})` : d.driver;
}

function driveName(d: DriveDescription): string {
  return `if=${d.interface}${d.media === 'disk' ? '' : `,media=${d.media}`}${d.index === undefined ? '' : `,index=${d.index}`}${d.format ? `,format=${d.format}` : ''}`;
}

/** `present` minus `absent` as a multiset, in `present`'s order. */
function missing(present: string[], absent: string[]): string[] {
  const left = [...absent];
  return present.filter((x) => {
    const i = left.indexOf(x);
    if (i < 0) return true;
    left.splice(i, 1);
    return false;
  });
}

/** What the two machines compared are called in the differences' words. */
export interface MachineNames {
  source: string;
  destination: string;
}

/**
 * What differs between the source's machine and the destination's, in words; empty when QEMU can
 * load the one's migration into the other as far as the command lines tell. `names` says what the
 * two are (a base's machine against a source's, say).
 */
export function compareMachines(source: MachineDescription, destination: MachineDescription, qemuVersion = '7.2', names: MachineNames = { source: 'source', destination: 'destination' }): string[] {
  const differences: string[] = [];
  const { source: s, destination: d } = names;
  const pair = (what: string, a: string | number, b: string | number): void => {
    if (a !== b) differences.push(`${what}: ${s} ${a}, ${d} ${b}`);
  };
  pair('machine type', resolveMachineType(source.machineType, qemuVersion), resolveMachineType(destination.machineType, qemuVersion));
  if (source.memoryBytes !== destination.memoryBytes) differences.push(`memory: ${s} ${mib(source.memoryBytes)}, ${d} ${mib(destination.memoryBytes)}`);
  pair('cpus', source.cpus, destination.cpus);
  if (source.defaults !== destination.defaults) differences.push(`default devices: ${source.defaults ? `the ${s} has QEMU default devices, the ${d} -nodefaults` : `the ${s} has -nodefaults, the ${d} QEMU default devices`}`);
  pair('vga', source.vga, destination.vga);
  const src = source.devices.map(deviceName);
  const dst = destination.devices.map(deviceName);
  for (const x of missing(src, dst)) differences.push(`device ${x} missing at the ${d}`);
  for (const x of missing(dst, src)) differences.push(`device ${x} only at the ${d}`);
  if (missing(src, dst).length === 0 && missing(dst, src).length === 0 && src.join('\n') !== dst.join('\n')) {
    differences.push(`devices in another order (their PCI slots would differ): ${s} ${src.join(', ')}; ${d} ${dst.join(', ')}`);
  }
  for (const b of missing(source.netBackends, destination.netBackends)) differences.push(`network backend ${b} missing at the ${d}`);
  for (const b of missing(destination.netBackends, source.netBackends)) differences.push(`network backend ${b} only at the ${d}`);
  const srcDrives = source.drives.map(driveName);
  const dstDrives = destination.drives.map(driveName);
  for (const x of missing(srcDrives, dstDrives)) differences.push(`drive ${x} missing at the ${d}`);
  for (const x of missing(dstDrives, srcDrives)) differences.push(`drive ${x} only at the ${d}`);
  return differences;
}
