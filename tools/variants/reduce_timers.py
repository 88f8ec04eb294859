"""Diagnostic patch for tools/kernel_variants.sh: the combine's reduce warps
time their waits for rows and their sums (%globaltimer) and print them
("DBG reduce ..." lines, two blocks x two warps per rank, DeepEP-size runs).
Used on 2026-11-26 to find that each reduce warp spends ~9 us of work per
14 KB token. Edits ffi/intranode.cu in place; exits non-zero if the anchors
moved."""
import sys

path = "ffi/intranode.cu"
src = open(path).read()
loop = '''    for (int64_t m = 0; m < num_tokens; ++m) {
      wait_token(m);'''
tail = '''        a.combined_weights[i * K + lane] = wsum;
      }
    }
'''
if src.count(loop) != 1 or src.count(tail) != 1:
  sys.exit("reduce_timers: the reduce loop's anchors moved; update this patch")
src = src.replace(loop, '''    uint64_t dbg_wait = 0, dbg_work = 0, dbg_tw1 = 0;
    const uint64_t dbg_start = GlobalTimerNs();
    for (int64_t m = 0; m < num_tokens; ++m) {
      const uint64_t dbg_tw0 = GlobalTimerNs();
      if (m > 0) dbg_work += dbg_tw0 - dbg_tw1;
      wait_token(m);
      dbg_tw1 = GlobalTimerNs();
      dbg_wait += dbg_tw1 - dbg_tw0;''')
src = src.replace(tail, tail + '''    if (num_tokens > 0) dbg_work += GlobalTimerNs() - dbg_tw1;
    if (lane == 0 && (b == 0 || b == G / 2) && (w == 0 || w == kReduceWarps - 1) && N >= 1024) {
      printf("DBG reduce me=%d b=%d w=%d tokens=%lld total_ns=%llu wait_ns=%llu work_ns=%llu\\n",
             me, b, w, (long long)num_tokens, (unsigned long long)(GlobalTimerNs() - dbg_start),
             (unsigned long long)dbg_wait, (unsigned long long)dbg_work);
    }
''')
open(path, "w").write(src)
