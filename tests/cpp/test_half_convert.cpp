// float16 / bfloat16 conversions: exhaustive round trips and round-to-nearest-even.
#include <gtest/gtest.h>

#include <cmath>

#include "pagedkv/half_convert.h"

using namespace pagedkv;

TEST(HalfConvert, Float16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_f16(f), uint16_t(h)) << "bits " << h;
  }
}

TEST(HalfConvert, BFloat16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = bf16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), uint16_t(h)) << "bits " << h;
  }
}

TEST(HalfConvert, RoundsToNearestEven) {
  // 1 + 2^-11 lies halfway between 1 and the next half (1 + 2^-10): ties go to even (1.0).
  EXPECT_EQ(float_to_f16(1.f + std::ldexp(1.f, -11)), 0x3c00);
  EXPECT_EQ(float_to_f16(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);
  EXPECT_EQ(float_to_f16(1.f + std::ldexp(1.f, -11) + std::ldexp(1.f, -20)), 0x3c01);
  EXPECT_EQ(float_to_f16(65520.f), 0x7c00);  // rounds up to infinity
  EXPECT_EQ(float_to_f16(65519.f), 0x7bff);
  EXPECT_EQ(float_to_f16(std::ldexp(1.f, -25)), 0x0000);  // tie with 0 goes to even
  EXPECT_EQ(float_to_f16(std::ldexp(3.f, -26)), 0x0001);
  EXPECT_EQ(float_to_bf16(1.f + std::ldexp(1.f, -8)), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.f + 3 * std::ldexp(1.f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(NAN))));
}
