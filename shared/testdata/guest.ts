/**
 * The test guest: Debian's kernel (apt-get download, dpkg -x) and a busybox initramfs whose init
 * keeps writing memory (tmpfs) and disk and prints a counter on the serial console. Built once into
 * a cache folder; needs apt-get, dpkg-deb, cpio and busybox-static (./run setup installs them).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface GuestFiles {
  kernel: string;
  initrd: string;
}

/** virtio for the disk, in load order (Debian builds them as modules) */
const MODULES = ['virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk'];

/**
 * The guest's init: 4 ticks a second, each writing 128 KiB of random bytes into tmpfs (512 KiB/s of
 * dirty memory, a light interactive workload) and one random 4 KiB block of the disk, and
 * printing `handoff-counter N`. Few processes per tick: each one dirties memory too.
 * The tmpfs files rotate over `handoff.files=N` of the kernel command line (default 1: the same file
 * rewritten, a working set of about a MiB; 128 gives 16 MiB).
 */
const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ${MODULES.join(' ')}; do insmod /lib/modules/$m.ko 2>/dev/null; done
mkdir -p /work
mount -t tmpfs -o size=48m tmpfs /work
files=1
for a in $(cat /proc/cmdline); do case $a in handoff.files=*) files=\${a#handoff.files=};; esac; done
n=0
while true; do
  n=$((n+1))
  echo "handoff-counter $n" > /dev/ttyS0
  dd if=/dev/urandom of=/work/blob$((n % files)) bs=128k count=1 2>/dev/null
  [ -b /dev/vda ] && dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=$((n % 8192)) conv=notrunc 2>/dev/null
  usleep 250000
done
`;

function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** The newest Debian 6.1 kernel package the apt index offers (reading the index first if it is empty). */
function kernelPackage(): string {
  return newestKernel() ?? (run('apt-get', ['update', '-qq']), newestKernel()) ?? fail('no linux-image-6.1.0-*-amd64 package in the apt index');
}

function fail(message: string): never {
  throw new Error(message);
}

function newestKernel(): string | undefined {
  const names = run('apt-cache', ['search', '--names-only', '^linux-image-6\\.1\\.0-[0-9]+-amd64$'])
    .split('\n')
    .map((l) => l.split(' ')[0]!)
    .filter(Boolean)
    .sort((a, b) => Number(/-(\d+)-amd64/.exec(a)![1]) - Number(/-(\d+)-amd64/.exec(b)![1]));
  return names.at(-1);
}

export function buildGuest(cacheDir: string): GuestFiles {
  const kernel = join(cacheDir, 'vmlinuz');
  // named by the init's content: a changed workload builds a new initramfs
  const initrd = join(cacheDir, `initrd-${createHash('sha256').update(INIT).digest('hex').slice(0, 12)}.cpio`);
  if (existsSync(kernel) && existsSync(initrd)) return { kernel, initrd };
  mkdirSync(cacheDir, { recursive: true });
  const work = join(cacheDir, 'build');
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  try {
    const pkg = kernelPackage();
    run('apt-get', ['download', '-q', pkg], work);
    const deb = readdirSync(work).find((f) => f.endsWith('.deb'))!;
    run('dpkg-deb', ['-x', deb, 'x'], work);
    const version = readdirSync(join(work, 'x', 'lib', 'modules'))[0]!;
    const root = join(work, 'initramfs');
    for (const d of ['bin', 'proc', 'sys', 'dev', 'lib/modules', 'work']) mkdirSync(join(root, d), { recursive: true });
    copyFileSync('/bin/busybox', join(root, 'bin', 'busybox'));
    chmodSync(join(root, 'bin', 'busybox'), 0o755);
    const modulesRoot = join(work, 'x', 'lib', 'modules', version, 'kernel');
    const found = run('find', [modulesRoot, '-name', '*.ko']).split('\n').filter(Boolean);
    for (const m of MODULES) {
      const path = found.find((f) => f.endsWith(`/${m}.ko`));
      if (path) copyFileSync(path, join(root, 'lib', 'modules', `${m}.ko`));
    }
    writeFileSync(join(root, 'init'), INIT, { mode: 0o755 });
    execFileSync('sh', ['-c', `cd ${JSON.stringify(root)} && find . | cpio -o -H newc --quiet > ${JSON.stringify(initrd)}`]);
    copyFileSync(join(work, 'x', 'boot', `vmlinuz-${version}`), kernel);
  } catch (err) {
    rmSync(kernel, { force: true });
    rmSync(initrd, { force: true });
    const stderr = (err as { stderr?: Buffer | string }).stderr?.toString().trim();
    throw new Error(`cannot build the test guest (needs apt-get, dpkg-deb, cpio, busybox-static): ${stderr || (err as Error).message}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return { kernel, initrd };
}
