"""Allow rules learned from what the history saw (``egress-agent learn``).

One concern per module, in the order the command runs them:

- :mod:`agent.learn.rows`: the rows to learn from, out of history files (read through a private
  copy, never in place) and osquery results exported from Fleet (JSON or CSV of
  ``external_connection_history``), each row labelled with the host it came from;
- :mod:`agent.learn.identity`: the strongest identity a row carries that an allow rule can
  name (a verified package, the executable's sha256, a system unit, a container image or name,
  a path, a name), or why it cannot hold;
- :mod:`agent.learn.networks`: the narrowest CIDRs that cover the addresses seen;
- :mod:`agent.learn.domains`: the names asked, with a wildcard only where several names under
  one parent were;
- :mod:`agent.learn.rules`: rows grouped into rules (identity, then destination, then ports and
  protocol), with what each was learned from;
- :mod:`agent.learn.yamltext`: the rules as YAML text the configuration accepts as it is;
- :mod:`agent.learn.merge`: the rules merged into an existing file, between markers, written
  atomically.

The rules are tried on a window before they are trusted by :mod:`agent.trial`.
"""
