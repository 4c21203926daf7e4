"""Run optimum's ORTOptimizer on an export folder (run by tests/test_fusion.py under
optimum's own interpreter, ``.venv-optimum/bin/python``; never imported by the tests).

usage: optimum_optimize.py SRC_FOLDER LEVEL OUT_FOLDER   (LEVEL: O1 | O2 | O3)
Prints one JSON line: {file: {contrib op: count}} of the optimised folder.
"""
import collections
import glob
import json
import os
import sys

import onnx
from optimum.onnxruntime import ORTOptimizer
from optimum.onnxruntime.configuration import AutoOptimizationConfig

src, level, out = sys.argv[1:4]
files = [os.path.basename(p) for p in glob.glob(os.path.join(src, "*.onnx"))]
ORTOptimizer.from_pretrained(src, file_names=files).optimize(
    save_dir=out, optimization_config=getattr(AutoOptimizationConfig, level)())
ops = {}
for p in sorted(glob.glob(os.path.join(out, "*.onnx"))):
    m = onnx.load(p, load_external_data=False)
    ops[os.path.basename(p)] = dict(collections.Counter(
        n.op_type for n in m.graph.node if n.domain == "com.microsoft"))
print(json.dumps(ops))
