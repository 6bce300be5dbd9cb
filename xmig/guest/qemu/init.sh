#!/bin/busybox sh
# /init of xmig's test guest (packed by xmig/guest/qemu/image.py): mounts proc/sys/dev, loads
# the virtio modules (virtio_ring first, else "Unknown symbol"), then runs the workload named on
# the kernel command line (xmig.workload=mem|disk|cpu|memdisk|idle, xmig.KEY=VALUE passed on as
# KEY=VALUE) with its progress lines on the serial console. init must never exit.
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod "/lib/modules/$m.ko" || echo "XMIG error insmod $m"
done
args=""
disk=/dev/vda
for x in $(cat /proc/cmdline); do
  case "$x" in
    xmig.disk=*) disk="${x#xmig.disk=}"; args="$args ${x#xmig.}" ;;
    xmig.*=*) args="$args ${x#xmig.}" ;;
  esac
done
case " $args " in
  *" workload=disk "* | *" workload=memdisk "*)
    n=0
    while [ ! -b "$disk" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ -b "$disk" ] || echo "XMIG error no disk $disk"
    ;;
esac
echo "XMIG init uptime=$(cut -d' ' -f1 /proc/uptime) args=$args"
/bin/xmig-workload $args
echo "XMIG exit rc=$?"
while :; do sleep 3600; done
