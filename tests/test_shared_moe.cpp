// SPDX-License-Identifier: Apache-2.0
// Tests of shared_moe (being written).
#include <catch2/catch.hpp>
