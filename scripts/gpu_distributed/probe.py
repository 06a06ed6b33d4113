# the micro-batch probe under a memory cap: a smaller power of two is chosen
import torch, yaml, sys
from hybridlab.graph import parse_arch
from hybridlab.model import HybridLM
from hybridlab.train import choose_micro_batch
from hybridlab.train_config import parse_training
from hybridlab.data import make_dataset
from hybridlab.distributed import Dist
raw = yaml.safe_load(open(sys.argv[1]))
arch = parse_arch({k: v for k, v in raw.items() if k != "training"})
cfg, spec = parse_training({**raw["training"], "seq_len": 2048, "tokens_per_step": 2048 * 64})
dev = torch.device("cuda")
model = HybridLM(arch).to(dev)
ds = make_dataset(spec, cfg.seq_len)
for frac in (1.0, 0.05, 0.01):
    torch.cuda.set_per_process_memory_fraction(frac)
    print("fraction", frac, "micro", choose_micro_batch(cfg, 64, model, ds, dev, torch.bfloat16, Dist(device=dev)), flush=True)
