"""Read, batch, write, acknowledge: the envelope, the COPY sink, the stream reads and acks, dead
letters and the retry loop. No process management here."""
