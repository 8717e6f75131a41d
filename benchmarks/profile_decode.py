import torch, time
from qwen1m import LLM, SamplingParams
llm = LLM("benchmarks/configs/qwen2.5-7b-instruct-1m", load_format="dummy", dtype="bfloat16", max_model_len=65536)
ids = torch.randint(0, 1000, (32768,)).tolist()
llm.engine.add_request(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
llm.engine.step(); llm.engine.step(); llm.engine.step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5): llm.engine.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
