"""xos-sshd: SSH gateway for virtual organisations."""
