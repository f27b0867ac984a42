"""The HTTP API's wire format, shared by ``e5v serve`` and :class:`e5v.RemoteEmbedder`: the
request models that parse and document a request, and the client's encoder of core inputs."""
