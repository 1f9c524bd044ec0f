from digitkit.cli import run

# Guarded: a spawned worker process (cv --workers N) imports the main module again and must not rerun the command.
if __name__ == "__main__":
    run()
