"""The sync stage: pull shard files from remote hosts over SFTP into ``sync/<source>/``.

One task per source (``sync.sources``, sorted by name). A task lists the files of its
source that match its patterns, downloads the new or changed ones (several at once, each
resumable from its ``.part``), verifies each (size, then sha256: computed on the host,
or read from a manifest beside the files, else size only), publishes it atomically and
records it in the task's completion marker. A rerun skips verified files and reports
files that vanished remotely without deleting them.

Modules: ``params`` (the ``sync`` node), ``plan``, ``listing`` (remote globbing),
``transfer`` (resumable download), ``verify``, ``record`` (what the last sync saw),
``task``, ``summary``.
"""
