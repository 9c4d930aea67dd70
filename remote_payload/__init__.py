"""What the controller pushes to a GPU host and runs there: `python -m remote_payload COMMAND`.

Standard library + `ngp_train` (+ numpy, pillow, ffmpeg-python, imageio-ffmpeg); never imports
`orchestrator`. The CLI and the files it writes are the contract in docs/contracts.md §2.

    __main__    argument parsing, subcommand registrars, one-line errors and exit codes
    commands    check-data, run, bootstrap, watchdog handlers
    checkdata   is a directory a usable NeRF-synthetic scene (before any GPU minute)
    pipeline    `run`: lock, signals, status, check → train → stages
    stages      render, ground truth, metrics, summary, videos; each skipped when done
    frames      numeric frame order, compositing on white
    videos      ffmpeg-python encoding, the labelled side-by-side comparison
    status      JOB_DIR/status.json (atomic) and process checks
    bootstrap   CUDA/GPU/torch/tcnn detection, env.json cache
    watchdog    the on-host dead-man's switch
    stage/      dataset staging from mirrors (issue #7)
"""
