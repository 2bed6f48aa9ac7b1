"""Teacher consistency (diagnostic for docs/distillation.md; run: python teacher_consistency.py runs/tiny_mdlm 4) over one student jump t -> t - 2dt (SDTT's two teacher steps), on held-out data states.

Over every position masked in z_t (what SDTT's loss runs over): compare the teacher's one-step
prediction p(.|z_t) with the arithmetic mean (forward-KL minimiser) and normalised geometric mean (reverse-KL
minimiser) and 'mean H(p_s)' (mean entropy of one draw) of SDTT's per-position target over K = 16 teacher draws of step 1 (positions the first step unmasks
keep p(.|z_t), as in sdtt.py), and the coordinate-wise median (roughly the TVD minimiser). z_t: 16 held-out blocks
noised at t = 1, 0.75, 0.5, 0.25 (the 4-step student's jumps). Prints mean entropies (nats) and KLs.
"""
import sys, torch
import numpy as np
from fewstep.checkpoint import load_model
from fewstep.data import TokenBlocks
from fewstep.diffusion.mdlm import q_xt
from fewstep.diffusion.schedule import LogLinear
torch.set_num_threads(1); torch.manual_seed(0)
m, meta = load_model(sys.argv[1], "cpu")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 4  # student steps
K = 16
val = TokenBlocks(meta["data"]["dir"] if "dir" in meta["data"] else "data/default-byte", "val", 128)
x0 = torch.from_numpy(np.asarray(val._blocks[:16]).astype(np.int64))
mask = m.mask_id
sched = LogLinear()
def H(lp): return -(lp.exp() * lp).sum(-1)
with torch.no_grad():
    for t in [1.0 - k / N for k in range(N)]:
        dt = 1 / (2 * N); s1 = t - dt
        a = lambda u: float(sched.alpha(torch.tensor(u, dtype=torch.float64)))
        z = q_xt(x0, torch.full((16,), a(t)), mask)
        lp = m(z, torch.full((16,), t))  # (B,L,V)
        move = (a(s1) - a(t)) / (1 - a(t))
        logs = []
        keep = None
        for _ in range(K):
            msk = z == mask
            u = torch.rand(z.shape)
            unm = msk & (u < move)
            tok = torch.distributions.Categorical(logits=lp.double()).sample()
            z1 = torch.where(unm, tok, z)
            ls = m(z1, torch.full((16,), s1))
            logs.append(torch.where(unm[..., None], lp, ls))  # SDTT target: step-1 positions keep p(z_t)
        L = torch.stack(logs)  # (K,B,L,V)
        sel = (z == mask)
        am = torch.logsumexp(L, 0) - np.log(K)  # log arithmetic mean (approx; includes positions unmasked in some draws)
        # positions unmasked in a draw get a one-hot; use only draws where still masked -> approximate by all: restrict
        gm = L.clamp(min=-80).mean(0).log_softmax(-1)
        md = L.exp().median(0).values; md = (md / md.sum(-1, keepdim=True)).clamp(min=1e-30).log()
        p = lp[sel]; A = am[sel]; G = gm[sel]; M = md[sel]
        kl = lambda x, y: (x.exp() * (x - y)).sum(-1).mean().item()
        print(f"t={t:.3f} dt={dt:.3f} masked={sel.sum().item()} H(p_t)={H(p).mean():.4f} H(arith)={H(A).mean():.4f} "
              f"H(geo)={H(G).mean():.4f} KL(arith||p_t)={kl(A,p):.4f} KL(geo||p_t)={kl(G,p):.4f} "
              f"mean H(p_s)={H(L[:, sel]).mean():.4f} H(median)={H(M).mean():.4f}")
