"""Names from DNS answers (``docs/DNS.md``): which names each remote address had.

``parse`` reads one DNS message; ``filter`` is the classic BPF program and the packet socket it
is attached to; ``answers`` matches answers to their queries and reassembles DNS over TCP;
``watch`` owns a packet socket per network namespace and its polling thread; ``cache`` keeps
address -> names per namespace with TTLs and bounds.
"""
