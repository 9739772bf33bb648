"""SSH and SFTP with verified host keys (DESIGN.md contract 8), for the sync stage and the
hosts launcher.

- ``known_hosts``: host keys checked against a known_hosts file; an unknown or changed
  key is refused with its fingerprint and the fix (``ssh-keyscan``), unless trust on
  first use was asked for by name.
- ``credentials``: how to log in (key file, ssh-agent, a password from an environment
  variable or from a credentials file only its owner can read); a password is never put
  in a message, a log, a marker or a config.
- ``ssh``: ``connect`` (paramiko ``SSHClient`` + ``RejectPolicy``), ``Connection.exec``
  (the remote command built with ``shlex.join``), ``Connection.sftp``.

Imports ``lib.core`` only.
"""
