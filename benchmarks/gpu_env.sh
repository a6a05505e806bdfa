# Sourced by the GPU scripts (gpu_all.sh, gpu_train_demo.sh) from the repository root with OUT
# set: picks the Python (the project's .venv where there is one), installs the wheels carried in
# .whl (packages the GPU machine lacks), and points the demo scene cache at .bench_cache.
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/taco_site .whl/*.whl
    export PYTHONPATH=/tmp/taco_site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -d .bench_cache ]]; then
    export TACO_CVGL_CACHE=$PWD/.bench_cache
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
