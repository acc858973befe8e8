"""A run on disk: its config (:mod:`.config`), its folder of data and clients (:mod:`.folder`),
the run information sent to devices (:mod:`.info`) and the partition of users into clients
(:mod:`.partition`). See docs/design.md, "Layout"."""
