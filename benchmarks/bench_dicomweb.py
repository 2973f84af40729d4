"""DICOMweb against a real Orthanc: WADO-RS with identity vs gzip encoding (issue 24, item 3), and
classify via DICOMweb through a latency proxy vs the same files from disk (issue 23, item 9).

    python benchmarks/bench_dicomweb.py [--copies 13] [--delay 0.1] [--workers 1 8] [--repeat 2]

The 16 RSNA chest DICOMs in ../shared/data/dicom are replicated ``--copies`` times with new study,
series and SOP instance UIDs (one study per copy: 13 copies = 208 instances), written to a folder
(the disk contender) and loaded into a throwaway Orthanc (with its DICOMweb plugin, 127.0.0.1).

1. Identity vs gzip: every instance fetched through cxr-batch's bounded fetch
   (:class:`cxr_batch.io.http.Origin`) with ``Accept-Encoding: identity`` and with ``gzip``,
   interleaved (the order alternates per instance); median ms per fetch and what Orthanc sent.
2. A latency proxy (a threaded HTTP proxy on 127.0.0.1 that waits ``--delay`` s before forwarding
   each request) in front of Orthanc; whole ``classify`` runs as subprocesses, interleaved:
   from disk, and via DICOMweb through the proxy with each ``--dicomweb-workers`` value. The
   ratio DICOMweb rate / disk rate per worker count (median of ``--repeat`` rounds), and the peak
   RSS of a DICOMweb run over all instances vs one over fewer than half of them (memory flat in
   the number of instances).

Prints the CPU model and flags; needs Orthanc and orthanc-dicomweb (as the tests do).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from orthanc_server import PASSWORD, USER, start_orthanc  # noqa: E402

RSNA = sorted((REPO.parent / "shared" / "data" / "dicom" / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))


def cpu() -> str:
    model, flags = "?", set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split() if f.startswith(("avx2", "avx512", "amx"))}
    return f"{model}; {os.cpu_count()} logical CPUs; flags {' '.join(sorted(flags))}"


def replicate(folder: Path, copies: int) -> list[tuple[Path, str]]:
    """The RSNA files ``copies`` times with new UIDs: [(path, study UID)]."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for c in range(copies):
        study = generate_uid(entropy_srcs=[f"bench-study-{c}"])
        for k, src in enumerate(RSNA):
            ds = pydicom.dcmread(src)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"bench-series-{c}-{k}"])
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"bench-sop-{c}-{k}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"c{c:02d}" / f"{k:02d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path)
            out.append((path, study))
    return out


def latency_proxy(port: int, delay: float) -> ThreadingHTTPServer:
    """A reverse proxy to 127.0.0.1:port that waits ``delay`` s before forwarding each request."""
    local = threading.local()

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            time.sleep(delay)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _forward
        do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def encoding_benchmark(base: str, uids: list[tuple[str, str, str]]) -> None:
    import base64

    from cxr_batch.io.http import Origin

    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    origin = Origin(base, headers={"Authorization": auth})
    times: dict[str, list[float]] = {"identity": [], "gzip": []}
    sent: dict[str, set[str]] = {"identity": set(), "gzip": set()}
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    for n, (study, series, sop) in enumerate(uids):
        url = f"{base}/studies/{study}/series/{series}/instances/{sop}"
        order = ("identity", "gzip") if n % 2 == 0 else ("gzip", "identity")
        for enc in order:
            start = time.perf_counter()

            def consume(answer: object, enc: str = enc) -> int:
                sent[enc].add(answer.headers.get("Content-Encoding", "identity"))  # type: ignore[attr-defined]
                return len(answer.read())  # type: ignore[attr-defined]

            origin.fetch("GET", url, headers={"Accept": accept, "Accept-Encoding": enc}, limit=1 << 30, consume=consume)
            times[enc].append((time.perf_counter() - start) * 1000)
    origin.close()
    for enc, values in times.items():
        print(
            f"  Accept-Encoding: {enc:8s} median {statistics.median(values):6.2f} ms/fetch, "
            f"total {sum(values) / 1000:6.2f} s for {len(values)}; Orthanc sent: {', '.join(sorted(sent[enc]))}"
        )
    print(f"  gzip/identity time ratio: {statistics.median(times['gzip']) / statistics.median(times['identity']):.2f}")


def retrieval_benchmark(web: str, n: int, workers: list[int]) -> None:
    """DicomwebSource.retrieve alone (no classification): what round trips cost, per worker count."""
    from cxr_batch.io.dicomweb import DicomwebConfig, DicomwebSource

    os.environ["CXR_BATCH_DICOMWEB_USER"], os.environ["CXR_BATCH_DICOMWEB_PASSWORD"] = USER, PASSWORD
    for w in workers:
        with DicomwebSource(DicomwebConfig(url=web, query=(("Modality", "CR"),), workers=w)) as source:
            items = source.discover().files
            start = time.perf_counter()
            got = 0
            for item in source.retrieve(items):
                assert item.error is None, item.error
                got += 1
                os.unlink(item.path)
            seconds = time.perf_counter() - start
        print(f"  --dicomweb-workers {w}: {got} instances in {seconds:6.2f} s ({got / seconds:6.1f} instances/s)")


def run(args: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(seconds, exit code, peak RSS in MB) of one cxr-batch command."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(err.decode()[-2000:], file=sys.stderr)
    return seconds, proc.returncode, usage.ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=13)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-encoding", action="store_true")
    parser.add_argument("--retrieval-only", action="store_true", help="only parts 1 and 2a (no classify runs)")
    a = parser.parse_args()
    if not RSNA:
        sys.exit("needs the RSNA DICOMs in ../shared/data/dicom")
    print(f"CPU: {cpu()}")
    print(f"command: python benchmarks/bench_dicomweb.py {' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory(prefix="cxr-bench-dicomweb-") as tmp:
        root = Path(tmp)
        files = replicate(root / "files", a.copies)
        n = len(files)
        server = start_orthanc(root / "orthanc", [p for p, _ in files])
        try:
            import pydicom

            uids = []
            for path, _ in files:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uids.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
            if not a.skip_encoding:
                print(f"\n1. WADO-RS of {n} instances from Orthanc, identity vs gzip (interleaved):")
                encoding_benchmark(server.dicomweb, uids)
            proxy = latency_proxy(server.port, a.delay)
            web = f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web"
            env = {**os.environ, "CXR_BATCH_DICOMWEB_USER": USER, "CXR_BATCH_DICOMWEB_PASSWORD": PASSWORD}
            env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
            print(
                f"\n2a. WADO-RS retrieval alone of {n} instances through the proxy ({a.delay * 1000:.0f} ms per request):"
            )
            retrieval_benchmark(web, n, a.workers)
            if a.retrieval_only:
                return
            common = ["classify", "--quiet", "--overwrite"]
            print(f"\n2. classify {n} instances: from disk vs DICOMweb through a proxy adding {a.delay * 1000:.0f} ms")
            results: dict[str, list[float]] = {"disk": [], **{f"web{w}": [] for w in a.workers}}
            peaks: dict[str, list[int]] = {k: [] for k in results}
            for r in range(a.repeat):
                for key in results:
                    out = str(root / f"{key}.csv")
                    if key == "disk":
                        args = [*common, str(root / "files"), "--out", out]
                    else:
                        w = key[3:]
                        args = [*common, "--dicomweb", web, "--query", "Modality=CR", "--out", out,
                                "--dicomweb-workers", w]  # fmt: skip
                    seconds, code, peak = run(args, env)
                    assert code == 0, (key, code)
                    results[key].append(seconds)
                    peaks[key].append(peak)
                    print(f"  round {r + 1} {key:6s} {seconds:6.2f} s  {n / seconds:6.1f} img/s  peak RSS {peak} MB")
            disk = statistics.median(results["disk"])
            for w in a.workers:
                web_s = statistics.median(results[f"web{w}"])
                print(f"  --dicomweb-workers {w}: DICOMweb/disk rate ratio {disk / web_s:.2f} "
                      f"(median {web_s:.2f} s vs {disk:.2f} s)")  # fmt: skip
            # memory flat in the number of instances: fewer than half the studies vs all of them
            w = max(a.workers)
            half = sorted({s for _, s in files})[: max(1, a.copies * 6 // 13)]
            studies = [x for s in half for x in ("--study", s)]
            few = sum(1 for _, s in files if s in half)
            out = str(root / "few.csv")
            _, code, peak_few = run(
                [*common, "--dicomweb", web, *studies, "--out", out, "--dicomweb-workers", str(w)], env
            )
            assert code == 0
            print(f"  peak RSS, --dicomweb-workers {w}: {few} instances {peak_few} MB, {n} instances "
                  f"{max(peaks[f'web{w}'])} MB")  # fmt: skip
            proxy.shutdown()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
