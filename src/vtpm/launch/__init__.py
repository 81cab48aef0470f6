"""Measured launch: digests of a guest's kernel, command line and initrd, and the guest's start
(QEMU) on its freshly measured vTPM. The launch record they produce is `vtpm.launchrecord`;
the instance writes the TCG event log (`vtpm.instance.launchlog`)."""
