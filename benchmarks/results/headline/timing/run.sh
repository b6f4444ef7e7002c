cd REPO
export PYTHONPATH=REPO/src
W=/work/shared/data/wikitext-2-raw/wiki.test.raw
uptime > /tmp/timing_load.txt
/usr/bin/time -v python -m lowbit.cli -q quantize --recipe w4a16-gptq --calib-dtype bfloat16 --data $W --windows 1 --no-fp --no-save-model --out OUT/t_bf16 > /tmp/t_bf16.log 2>&1
uptime >> /tmp/timing_load.txt
/usr/bin/time -v python -m lowbit.cli -q quantize --recipe w4a16-gptq --data $W --windows 1 --no-fp --no-save-model --out OUT/t_fp32 > /tmp/t_fp32.log 2>&1
uptime >> /tmp/timing_load.txt
