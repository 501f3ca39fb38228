/** The destination's side of a handoff from QEMU's stream: its command line, its refusals, the pages it feeds. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import {
  RamPageLocator,
  WrittenPages,
  destinationCommand,
  pageRecords,
  pageRuns,
  ramBlockDifferences,
  splitCommandLine,
  streamRefusal,
  type HostFiles,
  type StreamDestination,
} from '../../services/receiver/stream-resume.js';
import { refusalOf, type Destination } from '../../services/receiver/verify.js';
import { describeMachine } from '../../shared/vm/qemu-process.js';
import type { Hello } from '../../shared/wire/frames.js';

const split = (line: string): string[] => line.trim().split(/\s+/);
/** a host with the kernel and initrd, nothing else */
const host: HostFiles = { exists: (p) => p === '/guest/bzImage' || p === '/guest/initrd' || p === '/usr/bin/qemu-system-x86_64', isDirectory: (p) => p === '/dev/hugepages' };
const paths = { dir: '/out/m1', disk: '/out/m1/disk.img.partial' };

/** the command line test/helpers/user-vm.ts writes */
const SOURCE = split(
  '/usr/bin/qemu-system-x86_64 -machine pc,accel=tcg -m 256M -smp 1 -display none -no-reboot -kernel /guest/bzImage -initrd /guest/initrd ' +
    '-nic user,model=virtio-net-pci -drive file=/src/disk.raw,format=raw,if=virtio -chardev file,id=serial0,path=/src/serial.log -serial chardev:serial0 ' +
    '-qmp unix:/src/vm.qmp,server=on,wait=off',
);
const BLOCKS = [
  { idstr: 'pc.ram', bytes: 256 << 20, offset: 0 },
  { idstr: '/rom@etc/acpi/tables', bytes: 128 << 10, offset: 256 << 20 },
  { idstr: '0000:00:02.0/vga.vram', bytes: 16 << 20, offset: (256 << 20) + (128 << 10) },
];

describe("the destination's command line", () => {
  test("the source's, with the drive on the rebuilt disk and sockets and logs in the migration's folder", () => {
    const c = destinationCommand(SOURCE, 0, paths, host);
    assert.deepEqual(c.problems, []);
    assert.deepEqual(
      c.argv,
      split(
        '/usr/bin/qemu-system-x86_64 -machine pc,accel=tcg -m 256M -smp 1 -display none -no-reboot -kernel /guest/bzImage -initrd /guest/initrd ' +
          '-nic user,model=virtio-net-pci -drive file=/out/m1/disk.img.partial,format=raw,if=virtio -chardev file,id=serial0,path=/out/m1/serial0.log -serial chardev:serial0 ' +
          '-qmp unix:/out/m1/qmp.sock,server=on,wait=off -S -incoming defer',
      ),
    );
    assert.equal(c.qmpSocket, '/out/m1/qmp.sock');
    assert.equal(c.serialLog, '/out/m1/serial0.log');
  });

  test('-daemonize, -S and -incoming dropped; -monitor, -serial, -pidfile, more -qmp mapped; a program not here looked up by name', () => {
    const c = destinationCommand(
      split(
        '/opt/qemu/bin/qemu-system-x86_64 -daemonize -S -incoming tcp:0:4444 -qmp tcp:localhost:4444,server,nowait -qmp-pretty unix:/run/b.qmp,server ' +
          '-monitor stdio -monitor none -serial mon:stdio -serial file:/var/log/s1 -serial chardev:c0 -pidfile /run/vm.pid -hda /src/a.img',
      ),
      0,
      paths,
      host,
    );
    assert.deepEqual(c.problems, []);
    assert.deepEqual(
      c.argv,
      split(
        'qemu-system-x86_64 -qmp unix:/out/m1/qmp.sock,server=on,wait=off -qmp-pretty unix:/out/m1/qmp-1.sock,server=on,wait=off ' +
          '-monitor unix:/out/m1/monitor.sock,server=on,wait=off -monitor none -serial file:/out/m1/serial.log -serial file:/out/m1/serial-1.log -serial chardev:c0 ' +
          '-pidfile /out/m1/qemu.pid -hda /out/m1/disk.img.partial -S -incoming defer',
      ),
    );
    assert.equal(c.serialLog, '/out/m1/serial.log');
  });

  test('chardevs: files and stdio become files in the folder, unix sockets sockets there, TCP ones stay; a logfile moves too', () => {
    const c = destinationCommand(
      split('qemu -chardev stdio,id=con,signal=off -chardev socket,id=mon0,path=/run/m.sock,server=on,wait=off -chardev socket,id=t,host=0.0.0.0,port=5555,server=on -chardev pty,id=p,logfile=/var/log/p.log -hda x.img'),
      0,
      paths,
      host,
    );
    assert.deepEqual(c.argv.slice(1, 9), [
      '-chardev',
      'file,id=con,path=/out/m1/con.log',
      '-chardev',
      'socket,id=mon0,path=/out/m1/mon0.sock,server=on,wait=off',
      '-chardev',
      'socket,id=t,host=0.0.0.0,port=5555,server=on',
      '-chardev',
      'pty,id=p,logfile=/out/m1/p.chardev.log',
    ]);
    // no -qmp of the source's: the receiver adds its own
    assert.deepEqual(c.argv.slice(-5), ['-qmp', 'unix:/out/m1/qmp.sock,server=on,wait=off', '-S', '-incoming', 'defer']);
  });

  test('commas in a mapped path are escaped; a file-backed RAM gets its own file, a hugepage folder stays', () => {
    const c = destinationCommand(['qemu', '-drive', 'file=/src/a.img,if=virtio'], 0, { dir: '/out/a,b', disk: '/out/a,b/disk.img' }, host);
    assert.equal(c.argv[2], 'file=/out/a,,b/disk.img,if=virtio');
    const ram = destinationCommand(
      split('qemu -object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/vm.ram,share=on -object memory-backend-file,id=huge,size=1G,mem-path=/dev/hugepages -hda a.img'),
      0,
      paths,
      host,
    );
    assert.equal(ram.argv[2], 'memory-backend-file,id=mem,size=256M,mem-path=/out/m1/mem.ram,share=on');
    assert.equal(ram.argv[4], 'memory-backend-file,id=huge,size=1G,mem-path=/dev/hugepages');
  });

  test('the handed-off disk is the base drive; another disk, -blockdev, a kernel missing here are problems, named', () => {
    const c = destinationCommand(split('qemu -kernel /nowhere/vmlinuz -L /nowhere/roms -cdrom /iso/x.iso -drive file=/src/d.img,if=virtio -blockdev driver=file,filename=/b.img,node-name=b'), 1, paths, host);
    assert.equal(c.argv[8], 'file=/out/m1/disk.img.partial,if=virtio');
    assert.deepEqual(c.problems, [
      '-kernel /nowhere/vmlinuz: no such file at the destination',
      '-L /nowhere/roms: no such file at the destination',
      'drive 0 (-cdrom, /iso/x.iso) is not the handed-off disk: a handoff carries one disk',
      '-blockdev driver=file,filename=/b.img,node-name=b: the destination runs drives of -drive, -hda and the like only',
    ]);
    assert.deepEqual(destinationCommand(split('qemu -m 1G'), 0, paths, host).problems, ["the base's disk is drive 0, the command line has 0 drives"]);
    // a drive without a file (an empty CD-ROM) counts, and stays
    const empty = destinationCommand(split('qemu -drive if=ide,media=cdrom -drive file=/src/d.img'), 1, paths, host);
    assert.deepEqual(empty.problems, []);
    assert.deepEqual(empty.argv.slice(1, 5), ['-drive', 'if=ide,media=cdrom', '-drive', 'file=/out/m1/disk.img.partial']);
    assert.throws(() => destinationCommand(['qemu', '-m'], 0, paths, host), /-m needs an argument/);
    const deep = `/out/${'d'.repeat(100)}`;
    assert.deepEqual(destinationCommand(split('qemu -hda a.img'), 0, { dir: deep, disk: `${deep}/disk.img` }, host).problems, [
      `the socket ${deep}/qmp.sock is longer than a unix socket's path may be (107 bytes): give a shorter --out`,
    ]);
  });

  test("an operator's command line is split as a shell would", () => {
    assert.deepEqual(splitCommandLine(` qemu-system-x86_64 -m 256M  -append 'console=ttyS0 quiet' -name "a \\"vm\\"" a\\ b ''`), ['qemu-system-x86_64', '-m', '256M', '-append', 'console=ttyS0 quiet', '-name', 'a "vm"', 'a b', '']);
    assert.throws(() => splitCommandLine("qemu -append 'x"), /unclosed '/);
  });
});

describe('refusals at the hello', () => {
  const stream: StreamDestination = { ramBlocks: BLOCKS, baseMachine: describeMachine(SOURCE), diskDrive: 0, host };
  const machine = { argv: SOURCE, ramBlocks: BLOCKS };

  test("the source's own machine on its own command line is taken", () => {
    assert.equal(streamRefusal(machine, stream), undefined);
  });

  test("an operator's machine with other RAM, without the NIC, with another machine type: each difference named", () => {
    const other = SOURCE.map((a) => (a === '256M' ? '512M' : a === 'pc,accel=tcg' ? 'q35,accel=tcg' : a)).filter((a, i, all) => a !== '-nic' && all[i - 1] !== '-nic');
    // without -nic, QEMU's default NIC (e1000e on q35) is there instead
    assert.equal(
      streamRefusal(machine, { ...stream, qemuCommand: other }),
      "the destination cannot run the source's machine: machine type: source pc-i440fx-7.2, destination pc-q35-7.2; memory: source 256 MiB, destination 512 MiB; " +
        'device virtio-net-pci missing at the destination; device e1000e only at the destination',
    );
    const noNic = SOURCE.map((a) => (a === 'user,model=virtio-net-pci' ? 'none' : a));
    assert.equal(
      streamRefusal(machine, { ...stream, qemuCommand: noNic }),
      "the destination cannot run the source's machine: device virtio-net-pci missing at the destination; network backend user missing at the destination",
    );
  });

  test("a source whose machine is not the base's", () => {
    const bigger = SOURCE.map((a) => (a === '256M' ? '1G' : a));
    assert.equal(
      streamRefusal({ argv: bigger, ramBlocks: BLOCKS }, stream),
      "the destination cannot run the source's machine: memory: base 256 MiB, source 1024 MiB",
    );
  });

  test("RAM blocks that are not the base's: missing, other sizes, other places, extra, another order", () => {
    const [ram, acpi, vram] = BLOCKS as [(typeof BLOCKS)[0], (typeof BLOCKS)[0], (typeof BLOCKS)[0]];
    assert.deepEqual(ramBlockDifferences(BLOCKS, BLOCKS), []);
    assert.deepEqual(ramBlockDifferences([{ ...ram, bytes: 512 << 20 }, acpi, vram], BLOCKS), ['RAM block pc.ram: source 512 MiB, destination 256 MiB']);
    assert.deepEqual(ramBlockDifferences([ram, acpi], BLOCKS), ['RAM block 0000:00:02.0/vga.vram (16 MiB) only at the destination']);
    assert.deepEqual(ramBlockDifferences([...BLOCKS, { idstr: 'x', bytes: 1000, offset: 1 << 30 }], BLOCKS), ['RAM block x (1000 bytes) missing at the destination']);
    assert.deepEqual(ramBlockDifferences([ram, { ...acpi, offset: acpi.offset + PAGE_SIZE }, vram], BLOCKS), [`RAM block /rom@etc/acpi/tables: at byte ${acpi.offset + PAGE_SIZE} of the source's memory image, ${acpi.offset} of the destination's`]);
    assert.deepEqual(ramBlockDifferences([ram, vram, acpi], BLOCKS), [
      'RAM blocks in another order: source pc.ram, 0000:00:02.0/vga.vram, /rom@etc/acpi/tables; destination pc.ram, /rom@etc/acpi/tables, 0000:00:02.0/vga.vram',
    ]);
    assert.equal(
      streamRefusal({ argv: SOURCE, ramBlocks: [{ ...ram, bytes: 512 << 20 }, acpi, vram] }, stream),
      "the destination cannot run the source's machine: RAM block pc.ram: source 512 MiB, destination 256 MiB",
    );
  });

  test('the receiver refuses a machine hello where it cannot resume one, and names what differs where it can', () => {
    const BASE = { memory: 'aa', disk: 'bb' };
    const destination: Destination = { baseHashes: BASE, bytes: { memory: 4096, disk: 8192 }, resumesVms: false };
    const hello: Hello = { migrationId: 'm1', baseHashes: BASE, bytes: { memory: 4096, disk: 8192 }, machine };
    assert.match(refusalOf(hello, destination)!, /cannot resume the source's machine \(start it with --base DIR --resume-vm\)/);
    assert.equal(refusalOf(hello, { ...destination, stream }), undefined);
    assert.match(refusalOf({ ...hello, machine: { ...machine, ramBlocks: [{ ...BLOCKS[0]!, bytes: 1 << 30 }, ...BLOCKS.slice(1)] } }, { ...destination, stream })!, /RAM block pc.ram: source 1024 MiB, destination 256 MiB/);
    // a shared-file VM's hello still needs the shared-file resumer
    assert.match(refusalOf({ ...hello, machine: undefined, vm: { memoryBytes: 4096, cpus: 1, append: '' } }, { ...destination, stream })!, /cannot resume VMs/);
  });
});

describe("the feeder's pages", () => {
  test('pages written are taken once each, in order, and again after a new write', () => {
    const w = new WrittenPages(100);
    for (const i of [42, 7, 99, 7, 0, 8]) w.mark(i);
    assert.equal(w.count, 5);
    assert.deepEqual(w.take(3), [0, 7, 8]);
    assert.equal(w.count, 2);
    w.mark(7);
    assert.deepEqual(w.take(), [7, 42, 99]);
    assert.equal(w.count, 0);
    assert.deepEqual(w.take(), []);
    assert.throws(() => w.mark(100), /past the end/);
  });

  test("a page of the flat image is found in its RAM block; one in a block's padding or past the end in none", () => {
    const blocks = [
      { idstr: 'pc.ram', bytes: 4 * PAGE_SIZE, offset: 0 },
      { idstr: 'rom', bytes: PAGE_SIZE + 100, offset: 4 * PAGE_SIZE },
      { idstr: 'vram', bytes: 2 * PAGE_SIZE, offset: 8 * PAGE_SIZE },
    ];
    const l = new RamPageLocator(blocks);
    assert.deepEqual(l.locate(0), { block: 'pc.ram', offset: 0 });
    assert.deepEqual(l.locate(3), { block: 'pc.ram', offset: 3 * PAGE_SIZE });
    assert.deepEqual(l.locate(5), { block: 'rom', offset: PAGE_SIZE });
    assert.deepEqual(l.locate(9), { block: 'vram', offset: PAGE_SIZE });
    assert.throws(() => l.locate(7), /memory page 7 lies in no RAM block/);
    assert.throws(() => l.locate(10), /lies in no RAM block/);
  });

  test('written pages become page records read in runs; a zeroed page a zero record', () => {
    assert.deepEqual(pageRuns([1, 2, 3, 5, 6, 9], 2), [
      { first: 1, count: 2 },
      { first: 3, count: 1 },
      { first: 5, count: 2 },
      { first: 9, count: 1 },
    ]);
    const l = new RamPageLocator([
      { idstr: 'pc.ram', bytes: 4 * PAGE_SIZE, offset: 0 },
      { idstr: 'vram', bytes: 4 * PAGE_SIZE, offset: 4 * PAGE_SIZE },
    ]);
    const reads: [number, number][] = [];
    const read = (first: number, count: number): Buffer => {
      reads.push([first, count]);
      const b = Buffer.alloc(count * PAGE_SIZE);
      for (let i = 0; i < count; i++) if (first + i !== 4) b.fill(first + i, i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      return b;
    };
    const records = pageRecords([2, 3, 4, 6], read, l);
    assert.deepEqual(reads, [
      [2, 3],
      [6, 1],
    ]);
    assert.deepEqual(
      records.map((r) => (r.kind === 'ram-page' ? [r.kind, r.block, r.offset, r.data[0]] : r.kind === 'ram-zero' ? [r.kind, r.block, r.offset, r.fill] : [r.kind])),
      [
        ['ram-page', 'pc.ram', 2 * PAGE_SIZE, 2],
        ['ram-page', 'pc.ram', 3 * PAGE_SIZE, 3],
        ['ram-zero', 'vram', 0, 0],
        ['ram-page', 'vram', 2 * PAGE_SIZE, 6],
      ],
    );
  });
});
