"""pdserve's serving benchmark: an asyncio load generator over the public gRPC API.

Run it with ``python -m pdserve.bench --help``. The package is split by job:

- ``records``: what one request looked like on the wire (timestamps, token counts, errors);
- ``metrics`` and ``slo``: figures computed from records, and the SLO string parser;
- ``workloads``, ``sharegpt`` and ``arrival``: what to send, and when;
- ``client`` and ``runner``: sending it and recording what came back;
- ``report`` and ``plots``: the table, the JSON file and the PNG plots;
- ``compare``: starting several cluster configs in turn and comparing them;
- ``cli``: the command line that ties it together.
"""
