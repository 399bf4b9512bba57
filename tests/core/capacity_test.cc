#include "engram/core/capacity.h"

#include <cmath>

#include <gtest/gtest.h>

namespace engram::core {
namespace {

TEST(Capacity, ClassicalIsPointOneThreeEightN) {
  auto c = TheoreticalCapacity({.family = EnergyFamily::kClassical}, StateKind::kBipolar, 784);
  EXPECT_NEAR(c.patterns, 108.192, 1e-9);
  EXPECT_NEAR(c.exact_patterns, 784 / (2 * std::log(784.0)), 1e-9);
  EXPECT_NEAR(c.exact_patterns, 58.81, 0.01);
}

TEST(Capacity, PolynomialKrotovHopfield) {
  // n = 3, N = 100: N^2 / (2 * 3!! * ln N) = 10000 / (2 * 3 * 4.60517)
  auto c = TheoreticalCapacity({.family = EnergyFamily::kPolynomial, .degree = 3},
                               StateKind::kBipolar, 100);
  EXPECT_NEAR(c.patterns, 10000.0 / (6.0 * 4.605170185988091), 1e-6);
  // n = 2 reduces to N / (2 ln N).
  auto c2 = TheoreticalCapacity({.family = EnergyFamily::kPolynomial, .degree = 2},
                                StateKind::kBipolar, 100);
  EXPECT_NEAR(c2.patterns, 100.0 / (2.0 * 4.605170185988091), 1e-9);
}

TEST(Capacity, DoubleFactorial) {
  EXPECT_EQ(DoubleFactorial2nMinus3(2), 1.0);   // 1!!
  EXPECT_EQ(DoubleFactorial2nMinus3(3), 3.0);   // 3!!
  EXPECT_EQ(DoubleFactorial2nMinus3(4), 15.0);  // 5!!
  EXPECT_EQ(DoubleFactorial2nMinus3(5), 105.0); // 7!!
}

TEST(Capacity, ExponentialIsTwoToHalfN) {
  auto c = TheoreticalCapacity({.family = EnergyFamily::kExponential}, StateKind::kBipolar, 40);
  EXPECT_DOUBLE_EQ(c.patterns, std::pow(2.0, 20));
}

TEST(Capacity, OneStepErrorClosedForm) {
  // 1/2 erfc(sqrt(N/2K)); at K/N = 0.138: 1/2 erfc(1.90347) = 0.00355221
  // (reference value from an independent erfc table).
  EXPECT_NEAR(ClassicalOneStepErrorProbability(1000, 138), 0.0035522109, 1e-9);
  EXPECT_NEAR(ClassicalOneStepErrorProbability(100, 50), 0.5 * std::erfc(1.0), 1e-15);
  EXPECT_EQ(ClassicalOneStepErrorProbability(100, 0), 0.0);
}

}  // namespace
}  // namespace engram::core
