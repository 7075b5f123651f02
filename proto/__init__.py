"""pdserve's protocol definitions (`.proto` sources) and their generated stubs.

Import stubs through `proto.api` (never a bare `pdserve_pb2`): it checks that `proto` is
this package and not the `proto-plus` distribution's top-level module of the same name.
"""
