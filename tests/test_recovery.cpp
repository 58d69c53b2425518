// SPDX-License-Identifier: Apache-2.0
// Tests of recovery (being written).
#include <catch2/catch.hpp>
