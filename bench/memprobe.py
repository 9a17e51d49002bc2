#!/usr/bin/env python3
"""Memory of a running ccmgr instance: starts a flat stack of N `sleep` services (standby on)
with the ccmgr binary BIN, waits a second, prints RSS and PSS per process (keeper,
coordinator, standby; KiB from /proc/PID/smaps_rollup) and their total, then stops it.

    bench/memprobe.py BIN N [TAG]

With TAG, each process's full /proc/PID/smaps is copied to TAG-N-ROLE.smaps in the current
directory (which mapping holds what). HOLD=PROGRAM runs PROGRAM CONFIG while the stack is up
(to look at it with other tools). Used for the README's "Memory" figures.
"""
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

binary = sys.argv[1]
n = int(sys.argv[2])
dump = sys.argv[3] if len(sys.argv) > 3 else None
d = Path(tempfile.mkdtemp(prefix=f"ccmgr-memprobe-{n}-"))
(d / "services.d").mkdir()
inst = f"memprobe{os.getpid()}"
cfg = d / "ccmgr.toml"
cfg.write_text(f'instance = "{inst}"\nservices_dir = "services.d"\nlog_dir = "log"\nrun_dir = "run"\n'
               '[coordinator]\nstandby = true\nstartup_timeout = "600s"\n')
for i in range(n):
    (d / "services.d" / f"s{i:05}.toml").write_text('command = ["/bin/sleep", "1000%d"]\n' % os.getpid())
try:
    r = subprocess.run([binary, "--config", str(cfg), "start"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode:
        print(r.stdout.decode()[-2000:])
        sys.exit(1)
    time.sleep(1.0)
    st = json.loads(subprocess.run([binary, "--config", str(cfg), "status", "--json"], stdout=subprocess.PIPE).stdout)
    total = [0, 0]
    for role in ("keeper", "coordinator", "standby"):
        pid = (st.get(role) or {}).get("pid")
        if not pid:
            continue
        vals = {}
        for line in open(f"/proc/{pid}/smaps_rollup"):
            p = line.split()
            if p[0] in ("Rss:", "Pss:", "Pss_Anon:", "Pss_File:", "Pss_Shmem:", "Private_Dirty:", "Anonymous:"):
                vals[p[0][:-1]] = int(p[1])
        total[0] += vals["Rss"]
        total[1] += vals["Pss"]
        print(f"N={n} {role:12} " + " ".join(f"{k}={v}" for k, v in vals.items()))
        if dump:
            shutil.copy(f"/proc/{pid}/smaps", f"{dump}-{n}-{role}.smaps")
    print(f"N={n} total RSS={total[0]} PSS={total[1]} KiB")
    if os.environ.get("HOLD"):
        subprocess.run([os.environ["HOLD"], str(cfg)])
finally:
    subprocess.run([binary, "--config", str(cfg), "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(d, ignore_errors=True)
