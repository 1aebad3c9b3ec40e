"""
Where maildrops are kept, behind the contracts of `pop3d.stores.interfaces`.

- `pop3d.stores.interfaces`: the store interfaces and the listing values.
- `pop3d.stores.posix`: the file mechanics the local-file stores share
  (opening without following links, the dotlock, the maildrop lock table
  and lock files, the one in-process lock registry, the mapping of OS
  errors to `pop3d.errors`).
- `pop3d.stores.common`: mailbox path templates and running blocking work
  in the reactor's thread pool.
- `pop3d.stores.counting`: the one loop that counts messages' sizes, and
  the helper processes that share a large count.
- `pop3d.stores.maildir`, `pop3d.stores.mbox`: the Maildir and mbox stores.
- `pop3d.stores.memory`: the in-memory store (`pop3d.testing.MemoryStore`).
"""
