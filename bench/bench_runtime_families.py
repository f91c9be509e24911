"""Runtime model-family benchmarks (BERT base/mini, ResNet-50, LSTM vs torch eager and onnxruntime;
mixed-length Session sweep); the measuring code is aimass.bench.runtime_families.

    python bench/bench_runtime_families.py [--quick] [--only bert-mini resnet50 lstm2x512 bert-base sweep]
"""
from aimass.bench.runtime_families import main

if __name__ == "__main__":
    main()
