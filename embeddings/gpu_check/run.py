"""One run of the GPU check: what it measures with, and its plan."""
import sys
from dataclasses import dataclass, field

from embeddings.gpu_check.measure import Clock, rate

# Texts per model call of the sweep, by kind of run.
CUDA_TEXTS_PER_CALL = (64, 128, 256, 512, 1024)
CPU_TEXTS_PER_CALL = (16, 32, 64)
QUICK_TEXTS_PER_CALL = (8, 16)


@dataclass(frozen=True)
class Plan:
    """What to measure: on which device, over how many texts, for how long."""

    device: str  # "cpu" or "cuda:<index>": the device of the sweep and the stages
    texts: int  # texts each measurement encodes, in one pipeline.encode call
    texts_per_call: tuple  # the sweep: texts per model call
    dtypes: tuple
    seconds: float  # each measurement runs this long after its warm-up (at least one call)
    warmup_texts: int
    deadline_s: float  # measurements that would start later are skipped
    devices: tuple = ()  # the devices section: CUDA devices ("cuda:0", ...) or ("cpu",); empty skips it
    devices_skipped: str = ""  # why the devices section is skipped, when it is
    quick: bool = False
    seed: int = 0
    rows_per_claim: int = 1000  # texts per backfill claim (backfill_embeddings --batch-size), for backfill_calls


@dataclass
class Run:
    """The model, the texts and the plan, with the reasons for what was skipped."""

    plan: Plan
    model: object
    texts: list
    tokens: int  # the texts' tokens, all together
    quiet: bool = False
    skipped: list = field(default_factory=list)
    clock: Clock = None

    def __post_init__(self):
        self.clock = Clock(self.plan.deadline_s)

    @property
    def device(self):
        return self.plan.device

    def progress(self, message):
        if not self.quiet:
            print(f"gpu_check: {message}", file=sys.stderr, flush=True)

    def skip(self, what, why):
        self.skipped.append(f"{what}: {why}")
        self.progress(f"skipped {what}: {why}")

    def out_of_time(self, what):
        """True, with the reason recorded, when the run's deadline has passed."""
        if not self.clock.expired():
            return False
        self.skip(what, f"past the run's deadline of {self.plan.deadline_s:.0f} s (--deadline)")
        return True

    def rate(self, call, texts=None, tokens=None):
        """Figures of `call()` over all the texts (or `texts` texts of `tokens` tokens)."""
        return rate(call, len(self.texts) if texts is None else texts, self.tokens if tokens is None else tokens,
                    self.device, self.plan.seconds)

    def warm_texts(self):
        return self.texts[: self.plan.warmup_texts]
