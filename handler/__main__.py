"""`python -m handler [runpod flags]` starts the RunPod worker."""

from handler.runpod_worker import main

if __name__ == "__main__":
    main()
