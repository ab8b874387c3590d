# xos-sshd on Debian trixie, where criu 4.x is a normal package.
#
#   docker build -t xos-sshd .
#   docker run -d --name xos-sshd --pid=host --cgroupns=host --network=host \
#     --cap-add SYS_ADMIN --cap-add CHECKPOINT_RESTORE --cap-add SYS_PTRACE \
#     --cap-add SETUID --cap-add SETGID --cap-add SETPCAP --cap-add CHOWN \
#     --cap-add FOWNER --cap-add DAC_OVERRIDE --cap-add KILL --cap-add AUDIT_WRITE \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     -v /etc/xos-sshd:/etc/xos-sshd:ro -v /var/lib/xos-sshd:/var/lib/xos-sshd \
#     -v /home:/home -v /run/xos-sshd:/run/xos-sshd xos-sshd
#
# Why those privileges: sessions switch to mapped accounts (SETUID, SETGID, CHOWN for new
# homes); CRIU dumps and restores as the job's uid with CHECKPOINT_RESTORE, SYS_PTRACE and
# SETPCAP ambient; jobs get PID and mount namespaces (SYS_ADMIN); seccomp/AppArmor profiles
# of container engines block the ptrace/namespace calls CRIU needs.
# [session] rlimits above the container's own hard limits need --cap-add SYS_RESOURCE
# (without it they are lowered to the container's).
# [session] pam = true runs /etc/pam.d/xos-sshd (installed below), whose modules look the
# mapped account up by name: so the image's /etc/nsswitch.conf names xos for passwd and
# group ("passwd: files xos", added by a sed below; libnss_xos reads the tables the gateway
# writes to /var/lib/xos-sshd/nss).  libpam-systemd is deliberately not installed: its
# pam_systemd registers each session with systemd-logind over D-Bus, and this container runs
# neither (xos-sshd is its only process), so it would pull in systemd and dbus for a module
# that can only fail.  The stack's "session optional pam_systemd.so" line is then skipped
# (a module that cannot be loaded, optional: the session goes on; xos-sshd doctor says so).
# Volumes: /etc/xos-sshd (config.toml, host keys, VO CA certificates and CRLs, read-only),
# /var/lib/xos-sshd (AMS database, NSS tables, images, audit log), /home (mapped homes),
# /run/xos-sshd (control socket, shared with the host's pam_xos).

FROM debian:trixie-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libpam0g-dev make \
    python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY xos_sshd /src/xos_sshd
COPY native /src/native
RUN python3 -m venv /opt/xos-sshd \
 && /opt/xos-sshd/bin/pip install --no-cache-dir /src \
 && make -C /src/native clean all

FROM debian:trixie-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends criu libpam0g libpam-modules \
    openssh-server python3 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/xos-sshd /opt/xos-sshd
COPY --from=build /src/native/build/libnss_xos.so.2 /usr/lib/x86_64-linux-gnu/
# passwd and group through libnss_xos too, after the local files (see the top); the build
# fails if a line was not there to extend.
RUN sed -Ei '/^(passwd|group):/ { /[[:space:]]xos([[:space:]]|$)/! s/[[:space:]]*$/ xos/ }' /etc/nsswitch.conf \
 && grep -Eq '^passwd:.*[[:space:]]xos$' /etc/nsswitch.conf \
 && grep -Eq '^group:.*[[:space:]]xos$' /etc/nsswitch.conf
COPY --from=build /src/native/build/pam_xos.so /usr/lib/x86_64-linux-gnu/security/
# Every session process starts through it (xos_sshd/session/spawn.py looks here first).
COPY --from=build /src/native/build/xos-session-exec /usr/libexec/xos-sshd/
COPY deploy/config.example.toml /etc/xos-sshd/config.toml
# The PAM service of sessions, used with [session] pam = true (README "Configuration").
COPY deploy/pam.d/xos-sshd /etc/pam.d/xos-sshd
ENV PATH=/opt/xos-sshd/bin:$PATH
VOLUME ["/etc/xos-sshd", "/var/lib/xos-sshd", "/home", "/run/xos-sshd"]
EXPOSE 22022
HEALTHCHECK --interval=60s --timeout=10s CMD ["xos-sshd", "--config", "/etc/xos-sshd/config.toml", "--check-config"]
ENTRYPOINT ["xos-sshd", "--config", "/etc/xos-sshd/config.toml"]
