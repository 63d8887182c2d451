"""The least traffic the exposure design allows: what `bytes_per_epoch` is held against."""

ROW_NUMBER_BYTES = 4  # a batch row travels as one int32


def round_bytes(batch: int, sizes: tuple, workers: int, itemsize: int, later_layers_here: bool,
                wire_itemsize: int | None = None, rows_travel: bool = True) -> list:
    """(request, reply) payload bytes of one worker in each synchronous round of a step, as the average of the
    workers' shares; errors and partial products take `wire_itemsize` bytes a number (`--wire`; the run's own
    by default); W1's rows travel with the step unless workers keep them (`--rekey`); `minimum_step_bytes` spells
    out each term."""
    inputs, hidden = sizes[:2]
    wire = itemsize if wire_itemsize is None else wire_itemsize
    w1_rows = inputs * hidden * itemsize / workers if rows_travel else 0  # W1 rows out and dW1 rows back alike
    hidden_rows = batch * hidden * wire  # d1 out, a z1 partial back
    first = (w1_rows + hidden_rows + ROW_NUMBER_BYTES * batch, w1_rows + hidden_rows)
    if later_layers_here:
        return [first]
    forwards, backwards = [], []
    for units, outputs in zip(sizes[1:-1], sizes[2:]):  # each later layer: H of its input's units, n outputs
        rows = units * outputs * itemsize / workers  # the layer's rows J_w out, their gradient rows back
        activations, errors = (batch * units * size / workers for size in (itemsize, wire))  # a[:, J_w], e[:, J_w]
        output_rows = batch * outputs * wire  # a partial product back, the layer's error out
        forwards.append((activations + rows, output_rows))
        backwards.insert(0, (output_rows, rows + errors))  # the last layer's backward first
    return [first, *forwards, *backwards]


def minimum_step_bytes(batch: int, sizes: tuple, workers: int, itemsize: int, later_layers_here: bool,
                       wire_itemsize: int | None = None, rows_travel: bool = True) -> int:
    """Payload bytes one training step of `batch` rows must move between the coordinator and its workers.

    With B rows, I inputs, H units of the first hidden layer, N workers, s bytes per number and w bytes per
    number of an error or partial product on the wire (w = s unless `--wire` narrows it; K_w, J_w: worker w's
    input columns and units of a hidden layer, which partition I and that layer):

        2 I H s       W1 rows K_w out (shuffled), dW1 rows K_w back; not while workers keep their rows (`--rekey`),
                      when instead W1's rows go out and come back once per re-key (`minimum_epoch_bytes`)
        2 N B H w     d1 out to every worker (it multiplies all H columns), a z1 partial back from each
        4 N B         the batch's row numbers, int32, to every worker (its pixels are cached there)
      and, unless the coordinator computes the later layers itself, for each later layer, whose input is a
      hidden layer of H units and whose output has n (the last layer's n is the O outputs):
        B H (s + w)   a[:, J_w] out, e[:, J_w] back (e: the error carried back to the layer's input)
        2 H n s       the layer's rows J_w out, their gradient rows back
        2 N B n w     the layer's error out to every worker, a partial product back from each

    Input shards are sent once per run and are not part of an epoch; nor is message framing.
    """
    rounds = round_bytes(batch, sizes, workers, itemsize, later_layers_here, wire_itemsize, rows_travel)
    per_worker = sum(request + reply for request, reply in rounds)
    return round(workers * per_worker)  # the shares were averages: whole bytes again


def epoch_batches(rows: int, batch_size: int) -> list:
    """The batch sizes of an epoch's steps in order: full ones, then the rest, if any, in a short last one."""
    full, rest = divmod(rows, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def minimum_epoch_bytes(rows: int, batch_size: int, sizes: tuple, workers: int, itemsize: int,
                        later_layers_here: bool, rekey_steps: int | None = 1) -> int:
    """The sum of `minimum_step_bytes` over an epoch's batches; with kept rows (`rekey_steps` N > 1, or None for
    every epoch), plus 2 I H s for each re-key: one, or steps / N on average (a checkpoint adds one)."""
    batches = epoch_batches(rows, batch_size)
    kept = rekey_steps != 1
    steps = sum(minimum_step_bytes(batch, sizes, workers, itemsize, later_layers_here, rows_travel=not kept)
                for batch in batches)
    if not kept:
        return steps
    rekeys = 1 if rekey_steps is None else len(batches) / rekey_steps
    inputs, hidden = sizes[:2]
    return round(steps + rekeys * 2 * inputs * hidden * itemsize)
