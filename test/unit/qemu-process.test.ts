/** The parts of a QEMU command line a migration's destination must match, and their differences in words. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { compareMachines, describeMachine, parseQemuOpts, parseQemuSize, processArgv } from '../../shared/vm/qemu-process.js';

const split = (line: string): string[] => line.trim().split(/\s+/);

describe('QEMU command lines', () => {
  test('sizes and QemuOpts as users write them', () => {
    assert.equal(parseQemuSize('1G'), 2 ** 30);
    assert.equal(parseQemuSize('1024M'), 2 ** 30);
    assert.equal(parseQemuSize('512'), 512 * 2 ** 20);
    assert.equal(parseQemuSize('2g'), 2 * 2 ** 30);
    assert.equal(parseQemuSize('1.5G'), 1.5 * 2 ** 30);
    assert.throws(() => parseQemuSize('lots'), /not a size/);
    assert.deepEqual([...parseQemuOpts('file=a,,b.img,if=virtio', 'file')], [['file', 'a,b.img'], ['if', 'virtio']]);
    assert.deepEqual([...parseQemuOpts('pc,accel=kvm', 'type')], [['type', 'pc'], ['accel', 'kvm']]);
  });

  test('memory, machine, cpus', () => {
    assert.equal(describeMachine(split('qemu-system-x86_64 -m 1G')).memoryBytes, 2 ** 30);
    assert.equal(describeMachine(split('qemu-system-x86_64 -m size=1024M')).memoryBytes, 2 ** 30);
    assert.equal(describeMachine(split('qemu-system-x86_64 -m 2048,slots=2,maxmem=8G')).memoryBytes, 2 ** 31);
    assert.equal(describeMachine(split('qemu-system-x86_64 --m 256')).memoryBytes, 256 * 2 ** 20);
    assert.equal(describeMachine(split('qemu-system-x86_64')).memoryBytes, 128 * 2 ** 20);
    assert.equal(describeMachine(split('qemu-system-x86_64 -M q35')).machineType, 'q35');
    const kvm = describeMachine(split('qemu-system-x86_64 -machine pc,accel=kvm'));
    assert.equal(kvm.machineType, 'pc');
    assert.equal(kvm.accel, 'kvm');
    assert.equal(describeMachine(split('qemu-system-x86_64 -machine type=pc-q35-7.2 -enable-kvm')).accel, 'kvm');
    assert.equal(describeMachine(split('qemu-system-x86_64 -smp 2')).cpus, 2);
    assert.equal(describeMachine(split('qemu-system-x86_64 -smp sockets=2,cores=2,threads=2')).cpus, 8);
    assert.equal(describeMachine(split('qemu-system-x86_64 -smp 4,sockets=1,cores=4')).cpus, 4);
  });

  test('drives, NICs and devices, with and without the defaults', () => {
    const m = describeMachine(split('qemu-system-x86_64 -hda disk.img -drive file=/var/lib/vm/data.qcow2,if=virtio,format=qcow2 -cdrom install.iso -nic user,model=virtio-net-pci -device virtio-rng-pci -device usb-tablet,bus=usb-bus.0 -display none -no-reboot'));
    assert.deepEqual(m.drives, [
      { interface: 'ide', media: 'disk', index: 0, file: 'disk.img' },
      { interface: 'virtio', media: 'disk', format: 'qcow2', file: '/var/lib/vm/data.qcow2' },
      { interface: 'ide', media: 'cdrom', index: 2, file: 'install.iso' },
    ]);
    assert.deepEqual(m.devices, [{ driver: 'virtio-net-pci', fromNic: true }, { driver: 'virtio-rng-pci' }, { driver: 'usb-tablet', bus: 'usb-bus.0' }]);
    assert.deepEqual(m.netBackends, ['user']);
    assert.equal(m.defaults, true);
    assert.equal(m.vga, 'std');
    const bare = describeMachine(split('qemu-system-x86_64 -nodefaults -netdev user,id=n0 -device virtio-net-pci,netdev=n0,addr=0x5'));
    assert.equal(bare.vga, 'none');
    assert.deepEqual(bare.devices, [{ driver: 'virtio-net-pci', addr: '0x5' }]);
    // no network given: QEMU's default NIC for the machine type
    assert.deepEqual(describeMachine(split('qemu-system-x86_64 -M q35')).devices, [{ driver: 'e1000e', fromNic: true }]);
    assert.deepEqual(describeMachine(split('qemu-system-x86_64 -nic none')).devices, []);
    assert.deepEqual(describeMachine(['qemu-system-x86_64', '-device', '{"driver":"virtio-blk-pci","drive":"d0"}']).devices.at(-1), { driver: 'virtio-blk-pci' });
    assert.throws(() => describeMachine(split('qemu-system-x86_64 -m')), /-m needs an argument/);
  });

  test('the same machine written differently has no differences; local paths do not count', () => {
    const a = describeMachine(split('qemu-system-x86_64 -M pc -m 1G -smp 2 -drive file=/src/disk.img,if=virtio,format=raw -nic user,model=virtio-net-pci'));
    const b = describeMachine(split('qemu-system-x86_64 -machine pc-i440fx-7.2,accel=tcg -m size=1024M -smp cpus=2 -drive file=/dst/other.img,if=virtio,format=raw -netdev user,id=n0 -device virtio-net-pci,netdev=n0'));
    // with no other device, -nic and -netdev/-device put the one virtio-net-pci in the same first free slot
    assert.deepEqual(compareMachines(a, b), []);
  });

  test('differences are named in words', () => {
    const source = describeMachine(split('qemu-system-x86_64 -m 256M -nic user,model=virtio-net-pci -drive file=d.img,if=virtio'));
    const destination = describeMachine(split('qemu-system-x86_64 -M q35 -m 512M -smp 2 -nodefaults -drive file=d.img,if=ide'));
    assert.deepEqual(compareMachines(source, destination), [
      'machine type: source pc-i440fx-7.2, destination pc-q35-7.2',
      'memory: source 256 MiB, destination 512 MiB',
      'cpus: source 1, destination 2',
      'default devices: the source has QEMU default devices, the destination -nodefaults',
      'vga: source std, destination none',
      'device virtio-net-pci missing at the destination',
      'network backend user missing at the destination',
      'drive if=virtio missing at the destination',
      'drive if=ide only at the destination',
    ]);
    const reordered = compareMachines(describeMachine(split('q -device virtio-rng-pci -device virtio-balloon-pci')), describeMachine(split('q -device virtio-balloon-pci -device virtio-rng-pci')));
    assert.equal(reordered.length, 1);
    assert.match(reordered[0]!, /devices in another order/);
  });

  test('argv of a process from /proc', () => {
    assert.deepEqual(processArgv(process.pid), [process.execPath, ...process.execArgv, ...process.argv.slice(1)]);
  });
});
