'use strict';
// Test support: seeded random numbers, so every run sees the same inputs.

/**
 * mulberry32: a small seeded generator of uniform numbers in [0, 1).
 * @param {number} seed any 32-bit integer
 * @returns {() => number}
 */
function uniform(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Standard normal numbers (Box-Muller) from a seeded uniform generator.
 * @param {number} seed
 * @returns {() => number}
 */
function normal(seed) {
  const u = uniform(seed);
  return () => Math.sqrt(-2 * Math.log(1 - u())) * Math.cos(2 * Math.PI * u());
}

module.exports = { uniform, normal };
