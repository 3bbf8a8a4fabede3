#include "pagedkv/config.h"

#include "pagedkv/attention_params.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void validate_config(const CacheConfig& c) {
  PKV_CHECK(c.num_layers > 0, ArgumentError, "num_layers must be positive, got ", c.num_layers);
  PKV_CHECK(c.num_kv_heads > 0, ArgumentError, "num_kv_heads must be positive, got ", c.num_kv_heads);
  PKV_CHECK(c.head_dim > 0 && c.head_dim <= 512, ArgumentError,
            "head_dim must be in 1..512, got ", c.head_dim);
  PKV_CHECK(c.block_size > 0 && c.block_size <= 1024, ArgumentError,
            "block_size must be in 1..1024, got ", c.block_size);
  PKV_CHECK(c.device_blocks > 0, ArgumentError, "device_blocks must be positive, got ", c.device_blocks);
  PKV_CHECK(c.device_blocks < (int64_t(1) << 31), ArgumentError,
            "device_blocks must be below 2^31, got ", c.device_blocks);
  PKV_CHECK(c.host_blocks >= 0, ArgumentError, "host_blocks must be >= 0, got ", c.host_blocks);
  PKV_CHECK(c.disk_blocks >= 0, ArgumentError, "disk_blocks must be >= 0, got ", c.disk_blocks);
  // Slots and block ids are int32: every tier, and all of them together, below 2^31 blocks.
  PKV_CHECK(c.host_blocks < (int64_t(1) << 31), ArgumentError, "host_blocks must be below 2^31, got ",
            c.host_blocks);
  PKV_CHECK(c.disk_blocks < (int64_t(1) << 31), ArgumentError, "disk_blocks must be below 2^31, got ",
            c.disk_blocks);
  PKV_CHECK(c.device_blocks + c.host_blocks + c.disk_blocks < (int64_t(1) << 31), ArgumentError,
            "device_blocks + host_blocks + disk_blocks must be below 2^31 (block ids are int32), got ",
            c.device_blocks + c.host_blocks + c.disk_blocks);
  PKV_CHECK(c.window >= 0, ArgumentError, "window must be positive or None, got ", c.window);
  PKV_CHECK(c.sink_tokens >= 0, ArgumentError, "sink_tokens must be >= 0, got ", c.sink_tokens);
  PKV_CHECK(c.sink_tokens == 0 || c.window > 0, ArgumentError,
            "sink_tokens needs a window: sink tokens are the keys kept outside the window");
  PKV_CHECK(c.stripe_world >= 1 && c.stripe_world <= kMaxStripeWorld, ArgumentError,
            "group: pages stripe over 1..", kMaxStripeWorld, " ranks, got a group of ", c.stripe_world);
  PKV_CHECK(c.stripe_rank >= 0 && c.stripe_rank < c.stripe_world, ArgumentError, "group: rank ",
            c.stripe_rank, " is not in a group of ", c.stripe_world);
  PKV_CHECK(c.disk_blocks == 0 || c.host_blocks > 0, ArgumentError,
            "disk_blocks: the disk tier is staged through pinned host memory; give host_blocks > 0");
  PKV_CHECK(c.disk_read_piece == 0 || (c.disk_read_piece % 4096 == 0 && c.disk_read_piece >= (int64_t(256) << 10) &&
                                         c.disk_read_piece <= (int64_t(1) << 40)),
            ArgumentError, "disk_read_piece: expected 0 (whole blocks) or a multiple of 4096 from 262144 to 2^40 bytes, got ",
            c.disk_read_piece);
  PKV_CHECK(c.disk_crc == Crc32cPath::fold || c.disk_crc == Crc32cPath::crc32 || c.disk_crc == Crc32cPath::portable,
            ArgumentError, "disk_crc: expected fold, crc32 or portable");
  const GatherShape& g = c.gather_shape;
  PKV_CHECK(g.unroll == 2 || g.unroll == 4 || g.unroll == 8 || g.unroll == 16, ArgumentError,
            "gather_shape: unroll must be 2, 4, 8 or 16, got ", g.unroll);
  PKV_CHECK(g.threads >= 32 && g.threads <= 1024 && g.threads % 32 == 0, ArgumentError,
            "gather_shape: threads must be a multiple of 32 in 32..1024, got ", g.threads);
  PKV_CHECK(g.ctas_per_sm >= 1, ArgumentError, "gather_shape: ctas_per_sm must be >= 1, got ", g.ctas_per_sm);
  PKV_CHECK(c.staging == Staging::kernel || c.staging == Staging::dma, ArgumentError,
            "staging: expected kernel or dma");
  PKV_CHECK(c.copy_batch == CopyBatch::batch || c.copy_batch == CopyBatch::overlap ||
                c.copy_batch == CopyBatch::off, ArgumentError, "copy_batch: expected batch, overlap or off");
}

}  // namespace pagedkv
