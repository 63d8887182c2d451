"""Tuning constants shared by the coordinator and the workers, each with its unit and its reason."""

PROTOCOL_VERSION = 1  # bump on any change to a message's fields

DEFAULT_PORT = 5555

MAX_CHUNK_ROWS = 4096
"""Rows of one partial product (rows): a batch larger than this is sent in chunks whose gradients are
summed, so the full-batch preset needs neither huge messages nor huge memory (4096 x 128 float64 = 4 MiB)."""

MAX_HIDDEN_UNITS = 4096
"""Largest hidden layer (units) the message size limit is computed for."""

MAX_ROWS_PER_SPLIT = 1_000_000
"""Most images (rows) a worker accepts in one split of its shard."""

MAX_INPUT_COLUMNS = 4096
"""Most input columns (pixels) a network may have."""

REPLY_TIMEOUT = 60.0
"""Seconds the coordinator waits for one round of replies before it gives up on the run."""

REGISTER_TIMEOUT = 60.0
"""Seconds the coordinator waits, by default, for the expected workers to register."""

WORKER_CONNECT_TIMEOUT = 10.0
"""Seconds a worker waits for its welcome after registering before it registers again."""

STATUS_POLL_INTERVAL = 0.1
"""Seconds between the status thread's looks at whether it should stop: how long closing it may take."""

MAX_STATUS_REQUEST_BYTES = 1024
"""Largest status request (bytes) the status socket takes; its content is ignored, so more is only a nuisance."""
