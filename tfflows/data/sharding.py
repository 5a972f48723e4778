"""Which part of a split one input pipeline reads when several replicas or workers train.

A shard is None (one pipeline reads everything) or (num_shards, shard_index). Sources with
files shard by file when the files divide evenly among the shards, so every shard holds the
same share of the data and every image is seen equally often; otherwise every shard reads
every file and keeps every num_shards-th element (by element).
"""


def check_shard(num_shards, shard_index):
  """None for one shard, else (num_shards, shard_index); ValueError for impossible values."""
  if int(num_shards) != num_shards or num_shards < 1:
    raise ValueError(f'num_shards must be a positive integer, got {num_shards!r}')
  if int(shard_index) != shard_index or not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index must be in [0, {num_shards}), got {shard_index!r}')
  return (int(num_shards), int(shard_index)) if num_shards > 1 else None


def by_file(num_files, shard):
  """Whether a source of num_files files shards by file (else by element)."""
  return bool(shard) and num_files % shard[0] == 0


def shard_files(files, shard):
  """(files this shard reads, True if they are its whole part; False: it must also keep only
  every num_shards-th element of their stream)."""
  if not shard:
    return list(files), True
  if by_file(len(files), shard):
    return list(files)[shard[1]::shard[0]], True
  return list(files), False
