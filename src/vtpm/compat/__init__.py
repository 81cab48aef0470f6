"""The swtpm-compatible executables (`swtpm`, `swtpm_setup`, `swtpm_ioctl`) of the compat directory.

Nothing is imported here: `swtpm socket` must have its sockets bound before it loads more than
the standard library needs (`vtpm.compat.frontdoor`).
"""
