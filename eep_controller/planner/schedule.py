"""Grouping a plan's transfers into rounds that respect per-rank send and receive limits.

Rounds are an edge colouring of the bipartite sender/receiver multigraph: each rank is split
into k = min(max_sends_per_rank, max_recvs_per_rank) virtual ports, its transfers dealt to
the ports in turn, and the port graph is coloured with as many colours as its largest degree
(Koenig's theorem, alternating-path recolouring). So there are ceil(busiest rank's transfers
/ k) rounds, each at most k transfers long on any rank. That can leave up to k - 1 transfers
of slack on the busiest rank, so when the one-port colouring (which meets the lower bound
exactly) is shorter, it is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eep_controller.planner.rescale import RescalePlan, Transfer

TAG_LIMIT = 2**31


def tensor_tag(tag: int, tensor_index: int, num_tensors: int = 3) -> int:
    """Message tag for one tensor of a transfer: `tag * num_tensors + tensor_index`.

    With 3 tensors per expert (w1, w2, w3) this stays below 2**31 for 58 layers x 320 ranks
    x 9 slots (largest: 167,039 x 3 + 2 = 501,119). Raises ValueError when out of range.
    """
    if num_tensors < 1 or not 0 <= tensor_index < num_tensors:
        raise ValueError(f"tensor_index {tensor_index} out of range for {num_tensors} tensors")
    if tag < 0:
        raise ValueError(f"tag must be non-negative, got {tag}")
    value = tag * num_tensors + tensor_index
    if value >= TAG_LIMIT:
        raise ValueError(f"tensor tag {value} does not fit in a signed 32-bit integer")
    return value


@dataclass(frozen=True)
class TransferSchedule:
    """Transfers grouped into rounds, a unique tag per transfer, and the expected duration.

    `makespan` sums, over rounds, the busiest rank's bytes in or out in that round divided by
    the link bandwidth (seconds; bytes when no bandwidth was given). `makespan_lower_bound`
    is the busiest rank's total bytes in or out divided by the same bandwidth. Checkpoint
    reloads (src -1) count only for their receiver.
    """

    rounds: list[list[Transfer]]
    tags: dict[Transfer, int]
    makespan: float
    makespan_lower_bound: float
    expert_bytes: float
    link_bandwidth: float | None
    max_sends_per_rank: int
    max_recvs_per_rank: int
    rank_bytes_out: dict[int, float] = field(default_factory=dict)
    rank_bytes_in: dict[int, float] = field(default_factory=dict)

    def tag_of(self, transfer: Transfer) -> int:
        """The tag of `transfer`; KeyError if it is not part of this schedule."""
        return self.tags[transfer]


def transfer_tag(transfer: Transfer, num_ranks: int, slots_per_rank: int) -> int:
    """(layer x ranks + dst_rank) x slots + dst_slot: unique per destination slot."""
    return (transfer.layer * num_ranks + transfer.dst_rank) * slots_per_rank + transfer.dst_slot


def _colour_edges(edges: list[tuple[int, int]], num_nodes: int, colours: int) -> list[int]:
    """Proper edge colouring of a bipartite multigraph with max degree <= `colours`."""
    at: list[list[int]] = [[-1] * colours for _ in range(num_nodes)]
    colour = [-1] * len(edges)
    for e, (x, y) in enumerate(edges):
        a = at[x].index(-1)
        b = at[y].index(-1)
        if at[y][a] != -1:
            # flip the a/b alternating path that starts at y; it cannot reach x
            path: list[int] = []
            node, want = y, a
            while at[node][want] != -1:
                f = at[node][want]
                path.append(f)
                fx, fy = edges[f]
                node = fy if fx == node else fx
                want = b if want == a else a
            for f in path:
                fx, fy = edges[f]
                at[fx][colour[f]] = -1
                at[fy][colour[f]] = -1
            for f in path:
                fx, fy = edges[f]
                new = b if colour[f] == a else a
                colour[f] = new
                at[fx][new] = f
                at[fy][new] = f
        colour[e] = a
        at[x][a] = e
        at[y][a] = e
    return colour


def _rounds(transfers: list[Transfer], ports_per_rank: int) -> tuple[list[list[Transfer]], int]:
    """Rounds of an edge colouring with `ports_per_rank` virtual ports per rank, and the sum
    over rounds of the busiest rank's transfer count (the makespan in transfers)."""
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    ports: dict[tuple[str, int, int], int] = {}
    edges: list[tuple[int, int]] = []
    for t in transfers:
        if t.src_rank >= 0:
            k = sent.get(t.src_rank, 0)
            sent[t.src_rank] = k + 1
            src_key = ("s", t.src_rank, k % ports_per_rank)
        else:
            src_key = ("c", len(edges), 0)  # a checkpoint reload uses no sender
        k = received.get(t.dst_rank, 0)
        received[t.dst_rank] = k + 1
        dst_key = ("r", t.dst_rank, k % ports_per_rank)
        x = ports.setdefault(src_key, len(ports))
        y = ports.setdefault(dst_key, len(ports))
        edges.append((x, y))
    degree = [0] * len(ports)
    for x, y in edges:
        degree[x] += 1
        degree[y] += 1
    colours = max(degree, default=0)
    colour = _colour_edges(edges, len(ports), colours) if edges else []
    by_round: list[list[Transfer]] = [[] for _ in range(colours)]
    for t, c in zip(transfers, colour, strict=True):
        by_round[c].append(t)
    rounds = [r for r in by_round if r]
    total = 0
    for group in rounds:
        outs: dict[int, int] = {}
        ins: dict[int, int] = {}
        for t in group:
            if t.src_rank >= 0:
                outs[t.src_rank] = outs.get(t.src_rank, 0) + 1
            ins[t.dst_rank] = ins.get(t.dst_rank, 0) + 1
        total += max(max(outs.values(), default=0), max(ins.values(), default=0))
    return rounds, total


def schedule_transfers(
    plan: RescalePlan,
    expert_bytes: float,
    *,
    max_sends_per_rank: int = 1,
    max_recvs_per_rank: int = 1,
    link_bandwidth: float | None = None,
) -> TransferSchedule:
    """Rounds in which no rank sends more than `max_sends_per_rank` transfers or receives
    more than `max_recvs_per_rank`; every transfer appears exactly once. Deterministic."""
    if not expert_bytes > 0:
        raise ValueError(f"expert_bytes must be positive, got {expert_bytes}")
    if max_sends_per_rank < 1 or max_recvs_per_rank < 1:
        raise ValueError("max_sends_per_rank and max_recvs_per_rank must be at least 1")
    if link_bandwidth is not None and not link_bandwidth > 0:
        raise ValueError(f"link_bandwidth must be positive, got {link_bandwidth}")
    bandwidth = 1.0 if link_bandwidth is None else float(link_bandwidth)
    ranks, slots = plan.placement.num_ranks, plan.placement.slots_per_rank
    transfers = sorted(plan.transfers)
    tags = {t: transfer_tag(t, ranks, slots) for t in transfers}
    if len(set(tags.values())) != len(tags):
        raise ValueError("plan writes one destination slot more than once")

    # a rank's link is shared by its concurrent transfers, so more concurrency on one side
    # than the other only lengthens rounds: both sides use the smaller limit. Several ports
    # give fewer rounds but can leave up to ports - 1 transfers of slack on the busiest rank;
    # one port per rank always meets the lower bound, so it is kept when that is shorter.
    ports_per_rank = min(max_sends_per_rank, max_recvs_per_rank)
    rounds, busiest_sum = _rounds(transfers, ports_per_rank)
    if ports_per_rank > 1:
        single, single_sum = _rounds(transfers, 1)
        if single_sum < busiest_sum:
            rounds, busiest_sum = single, single_sum
    makespan = busiest_sum * expert_bytes / bandwidth
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    for t in transfers:
        if t.src_rank >= 0:
            sent[t.src_rank] = sent.get(t.src_rank, 0) + 1
        received[t.dst_rank] = received.get(t.dst_rank, 0) + 1
    bytes_out = {r: n * float(expert_bytes) for r, n in sorted(sent.items())}
    bytes_in = {r: n * float(expert_bytes) for r, n in sorted(received.items())}
    peak = max(max(bytes_out.values(), default=0.0), max(bytes_in.values(), default=0.0))
    return TransferSchedule(
        rounds=rounds,
        tags=tags,
        makespan=makespan,
        makespan_lower_bound=peak / bandwidth,
        expert_bytes=float(expert_bytes),
        link_bandwidth=link_bandwidth,
        max_sends_per_rank=max_sends_per_rank,
        max_recvs_per_rank=max_recvs_per_rank,
        rank_bytes_out=bytes_out,
        rank_bytes_in=bytes_in,
    )
