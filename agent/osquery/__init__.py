"""The osquery extension: table routes, query contexts, the Thrift server, lifecycle."""
