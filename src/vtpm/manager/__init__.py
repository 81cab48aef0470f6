"""The vTPM Manager: groups, seals, label policy, owner requests and the daemon."""
