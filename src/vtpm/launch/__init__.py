"""Measured launch: digests of a guest's kernel, command line and initrd, the launch record, its
TCG event log, and the guest's start (QEMU) on its freshly measured vTPM."""
