"""The lab for real machines: crv's own guest images (images.py), and one network namespace
with a bridge, DHCP and its own libvirtd where real qemu guests run (network.py,
hypervisor.py, control.py: `crv lab up` / `crv lab down`). docs/lab.md tells how to use it."""
