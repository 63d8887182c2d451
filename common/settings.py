"""Tuning constants shared by the coordinator and the workers, each with its unit and its reason."""

PROTOCOL_VERSION = 4  # bump on any change to a message's fields

MAX_CHUNK_ROWS = 4096
"""Rows of one partial product (rows): a batch larger than this is sent in chunks whose gradients are
summed, so the full-batch preset needs neither huge messages nor huge memory (4096 x 128 float64 = 4 MiB)."""

SHARD_CHUNK_BYTES = 64 * 1024
"""Bytes of images in one shard chunk: one chunk for each of 7 workers crosses a 5 Mbit/s link in under a
second, well inside the heartbeat timeout, so a worker waiting for its pixels keeps hearing from us."""

MAX_SHARD_ROWS = 10_000_000
"""Largest split (images) a worker accepts: bounds what one shard chunk can make it allocate."""

EVALUATION_REPLY_BYTES = 256 * 1024
"""Largest partial product (bytes) a worker returns during a test pass, which has no batch size of its own:
a worker's heartbeats wait behind its reply, so seven replies must cross a 20 Mbit/s link well inside the
heartbeat timeout (4096 rows of 128 float32 would be 2 MiB each, 6 s on such a link)."""

MAX_HIDDEN_UNITS = 4096
"""Largest hidden layer (units) a run may have: it bounds every message and the coordinator's memory."""

MAX_HIDDEN_LAYERS = 16
"""Most hidden layers a run may have: it bounds the later layers' operands a worker keeps (one pair per layer)."""

HEARTBEAT_INTERVAL = 0.5
"""Seconds between heartbeats from an idle side: six fit in the default timeout, so one late packet
or a busy moment on a loaded machine is not mistaken for death."""

HEARTBEAT_TIMEOUT = 3.0
"""Seconds of silence after which a peer counts as gone (the coordinator's `--heartbeat-timeout`; a
worker uses this value for the coordinator)."""

REQUEST_DEADLINE = 30.0
"""Seconds a worker may take over one request at the most: the largest chunk product takes well under a
second, so a worker that heartbeats but never answers is dropped long before a run would look hung."""

REQUEST_DEADLINE_FLOOR = 10.0
"""Seconds a request may always take, however fast its slot answered before: a busy machine's stalls and
a shard chunk behind a slow link stay well within it."""

REQUEST_DEADLINE_FACTOR = 20
"""Once a slot has answered, its requests may take this many times its slowest recent answer (within the
floor and the deadline): a worker that takes a slot over and never answers holds a round for 10 s, not 30."""

RECENT_ANSWERS = 50
"""Answers of a slot whose round trips set its deadline: a few epochs' worth of evaluation rounds and more."""

FAREWELL_LINGER = 0.5
"""Seconds a leaving worker waits for its Deregister to go out: a loopback or LAN send takes milliseconds, and
a Ctrl-C should not hang on a coordinator that is gone (then the heartbeat timeout tells it instead)."""

CLAIM_GRACE = 0.5
"""Seconds after a registration under a connected worker's name during which that worker's messages do not
refute the claim: after a stall of ours, frames its old connection sent before it gave up are read after the
new connection's registration, all within milliseconds; a live worker heartbeats every 0.5 s, so it still
refutes a claim within about a second."""

LOSS_SETTLE = 0.5
"""Seconds the coordinator keeps serving its socket after losing a worker before it moves the lost columns: after
a stall of ours, every worker is found gone within a heartbeat interval, and spreading a slot over workers that are
about to be found gone too would send (and record as seen) columns that none of them should get."""

REJOIN_WAIT = 30.0
"""Seconds the coordinator waits for lost workers to register again when it has lost every one, before it gives
up: a stall of ours longer than the heartbeat timeout makes every worker give up on its connection at once,
and each registers again within a backoff (8 s at the most) once we listen again."""

RECONNECT_BACKOFF = (0.5, 8.0)
"""Seconds a worker waits before registering again: the first wait, doubling up to the second."""

MAX_STANDBY_WORKERS = 16
"""Workers admitted beyond the slots (late joiners, spares): bounds what strangers can make us hold."""

VERIFY_RATE = 0.05
"""Fraction of results the coordinator Freivalds-checks with `--verify sample`: a persistent liar is
caught after 1 / 0.05 = 20 answers on average, for two matrix-vector products per checked result."""

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between summary lines about frames dropped from strangers: readable under a flood of garbage."""

STATUS_POLL_INTERVAL = 0.1
"""Seconds between the status thread's looks at whether it should stop: how long closing it may take."""

MAX_STATUS_REQUEST_BYTES = 1024
"""Largest status request (bytes) the status socket takes; its content is ignored, so more is only a nuisance."""
