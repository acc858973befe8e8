"""The networked deployment, operated from the server side: TLS certificates and device keys
(:mod:`.certs`), the process manager of SuperLink and SuperNodes (:mod:`.deployment`), the
operator's ``flwr`` commands (:mod:`.operator`), the server's run folder (:mod:`.provision`),
the one-machine dry run (:mod:`.loopback`) and the ``fedrec deploy`` commands (:mod:`.cli`)."""
