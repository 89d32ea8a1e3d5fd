using System;
using System.Collections.Generic;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Losses
{
    /// <summary>
    /// Learning without Forgetting, as in the 2026 paper (eq. 4): R_LwF(μ) = Σ_{ν&lt;μ} KL(ŷ_ν ‖ ŷ*_ν), where ŷ_ν is the
    /// current distribution of exit ν and ŷ*_ν the one of a frozen teacher (the network as it was when exit ν finished),
    /// on the same augmented batch.
    /// <para>Direction: KL(current ‖ teacher) = Σ_c ŷ_c (log ŷ_c − log ŷ*_c), the order the paper writes (the "reverse"
    /// KL of distillation, mode-seeking). Averaged over the batch ("batchmean"), no temperature.</para>
    /// </summary>
    /// <summary>Which frozen network gives the LwF targets ŷ*_ν of a stage.</summary>
    public enum LwfTeacherPolicy
    {
        /// <summary>
        /// The paper's definition: ŷ*_ν comes from the network as it was when exit ν finished training, one frozen copy
        /// per protected exit. A stage protecting exits 1..μ−1 runs μ−1 teacher forwards (Σ_ν of the cost up to exit ν).
        /// </summary>
        PerExit,
        /// <summary>
        /// Classic LwF (Li and Hoiem: the "old model" is the model before the current task): every ŷ*_ν comes from one
        /// frozen copy, the network as it was when the deepest protected exit finished (the previous stage of a
        /// sequential recipe). One teacher forward per step and one copy in memory; for ν below the deepest protected
        /// exit the target is the distribution after the later stages' (regularised) drift, not the one exit ν ended with.
        /// </summary>
        PreviousStage,
    }

    public static class Lwf
    {
        /// <summary>Mean over the batch of KL(softmax(current) ‖ softmax(teacher)). Never negative; zero when they agree.</summary>
        public static Tensor KlCurrentToTeacher(Tensor currentLogits, Tensor teacherLogits)
        {
            if (!currentLogits.shape.AsSpan().SequenceEqual(teacherLogits.shape) || currentLogits.dim() != 2)
                throw new ArgumentException($"LwF needs current and teacher logits of the same N×C shape, got [{string.Join(", ", currentLogits.shape)}] and [{string.Join(", ", teacherLogits.shape)}]");
            using var scope = NewDisposeScope();
            var logP = nn.functional.log_softmax(currentLogits, 1);
            var logQ = nn.functional.log_softmax(teacherLogits.detach(), 1);
            var kl = (logP.exp() * (logP - logQ)).sum(1L).mean();
            return kl.MoveToOuterDisposeScope();
        }

        /// <summary>Σ over the protected exits of KL(current ‖ teacher); both lists are aligned by exit.</summary>
        public static Tensor Penalty(IReadOnlyList<Tensor> currentLogits, IReadOnlyList<Tensor> teacherLogits)
        {
            if (currentLogits.Count != teacherLogits.Count) throw new ArgumentException("one teacher output per protected exit");
            if (currentLogits.Count == 0) throw new ArgumentException("LwF needs at least one earlier exit to protect");
            using var scope = NewDisposeScope();
            Tensor total = KlCurrentToTeacher(currentLogits[0], teacherLogits[0]);
            for (int i = 1; i < currentLogits.Count; i++) total = total + KlCurrentToTeacher(currentLogits[i], teacherLogits[i]);
            return total.MoveToOuterDisposeScope();
        }
    }
}
